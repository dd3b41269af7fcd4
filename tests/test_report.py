"""report.py: tables come from the MLflow store; marked tables in Markdown are regenerated."""

import mlflow
import mlflow.data
import numpy as np
import pytest

import report


@pytest.fixture()
def demo_runs(store, tmp_path):
    """Experiment "demo" in the store: two finished runs (b on a logged dataset) and a failed one.
    Returns its folder."""
    mlflow.set_experiment("demo")
    images = np.zeros((2, 4, 4, 1), np.float32)
    for name, loss, dice in (("a", "DiceLoss", 0.8), ("b", "BCELoss", 0.9)):
        with mlflow.start_run(run_name=name):
            mlflow.log_params({"loss": loss})
            mlflow.log_metrics({"test_dice": dice, "best_epoch": 7})
            if name == "b":
                scans = mlflow.data.from_numpy(images, name="scans", source=str(tmp_path))
                mlflow.log_input(scans, context="training")
    with mlflow.start_run(run_name="crashed"):
        mlflow.log_metrics({"test_dice": 0.99})
        mlflow.end_run("FAILED")
    return tmp_path


def test_table_lists_finished_runs_best_first(demo_runs):
    table = report.runs_table("demo", ["loss"], ["test_dice", "best_epoch"])
    assert table.splitlines() == [
        "| run | dataset | loss | test_dice | best_epoch |",
        "|---|---|---|---|---|",
        "| b | scans | BCELoss | 0.900 | 7 |",
        "| a |  | DiceLoss | 0.800 | 7 |",
    ]
    with pytest.raises(ValueError, match="no experiment 'nope'"):
        report.runs_table("nope")


def test_update_regenerates_marked_tables_and_leaves_the_rest(demo_runs):
    path = demo_runs / "README.md"
    marker = "<!-- report.py demo --params loss --metrics test_dice -->"
    path.write_text(f"intro\n{marker}\nstale\n<!-- end report -->\nend\n")
    assert report.update_file(path) == (1, [])
    assert path.read_text() == (
        "intro\n<!-- report.py demo --params loss --metrics test_dice -->\n"
        "| run | dataset | loss | test_dice |\n|---|---|---|---|\n| b | scans | BCELoss | 0.900 |\n"
        "| a |  | DiceLoss | 0.800 |\n<!-- end report -->\nend\n"
    )


def test_update_keeps_the_table_of_an_experiment_this_store_lacks_and_says_so(demo_runs, capsys):
    path = demo_runs / "REPORT.md"
    elsewhere = "<!-- report.py from-another-store --cv -->\n| old | table |\n<!-- end report -->\n"
    path.write_text(
        f"{elsewhere}<!-- report.py demo --metrics test_dice -->\nstale\n<!-- end report -->\n"
    )
    report.main(["--update", str(path)])
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: 1 tables regenerated",
        f"{path}: kept as they were (no such experiment here): from-another-store",
    ]
    text = path.read_text()
    assert text.startswith(elsewhere) and "| b | scans | 0.900 |" in text and "stale" not in text


def test_update_with_an_experiment_without_finished_runs_leaves_the_file_untouched(demo_runs):
    mlflow.set_experiment("only-failed")
    with mlflow.start_run(run_name="crashed"):
        mlflow.end_run("FAILED")
    path = demo_runs / "REPORT.md"
    demo = "<!-- report.py demo -->\nold\n<!-- end report -->\n"
    text = demo + "<!-- report.py only-failed -->\n<!-- end report -->\n"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--update", str(path)])
    assert exit_info.value.code == 2
    assert path.read_text() == text


def test_all_shows_every_status_in_a_status_column(demo_runs):
    table = report.runs_table("demo", metrics=["test_dice"], all_runs=True)
    assert table.splitlines() == [
        "| run | dataset | status | test_dice |",
        "|---|---|---|---|",
        "| crashed |  | FAILED | 0.990 |",
        "| b | scans | FINISHED | 0.900 |",
        "| a |  | FINISHED | 0.800 |",
    ]


def test_without_arguments_the_experiments_are_listed_with_their_run_counts(demo_runs, capsys):
    mlflow.set_experiment("empty")
    report.main([])
    assert capsys.readouterr().out.splitlines() == [
        "| experiment | runs | finished | failed | killed | running |",
        "|---|---|---|---|---|---|",
        "| Default | 0 | 0 | 0 | 0 | 0 |",
        "| demo | 3 | 2 | 1 | 0 | 0 |",
        "| empty | 0 | 0 | 0 | 0 | 0 |",
    ]


def test_cases_prints_a_runs_per_case_table(store, capsys):
    table = {
        "columns": ["case", "class", "dice", "hd95"],
        "data": [["a", 1, 0.5, 2.25], ["b", 1, 0.0, None]],
    }
    mlflow.set_experiment("demo")
    with mlflow.start_run() as run:
        mlflow.log_dict(table, "test_cases.json")
    report.main(["--cases", run.info.run_id])
    assert capsys.readouterr().out.splitlines() == [
        "| case | class | dice | hd95 |",
        "|---|---|---|---|",
        "| a | 1 | 0.500 | 2.250 |",
        "| b | 1 | 0.000 | inf |",
    ]
    with mlflow.start_run() as bare:
        pass
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--cases", bare.info.run_id])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"report.py: error: run {bare.info.run_id} has no")


def test_cv_lists_the_parent_runs_with_their_spread_not_their_folds(store, capsys):
    mlflow.set_experiment("cv")
    with mlflow.start_run(run_name="UNet_cv2"):
        mlflow.log_params({"cv_folds": 2, "encoder": "plain"})
        mlflow.log_metrics({"test_dice_mean": 0.81, "test_dice_std": 0.02})
        mlflow.log_metrics({"ensemble_test_dice": 0.84, "single_test_dice_mean": 0.8})
        mlflow.log_metric("single_test_dice_std", 0.01)
        with mlflow.start_run(run_name="UNet_fold0", nested=True):
            mlflow.log_params({"cv_folds": 2, "cv_fold": 0})
            mlflow.log_metric("test_dice", 0.83)
    report.main(["cv", "--cv", "--params", "encoder"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| run | dataset | encoder | folds | Dice | IoU |")
    assert len(lines) == 3  # the header, its rule, the parent: no fold
    assert lines[2].startswith("| UNet_cv2 |  | plain | 2 | 0.810 ± 0.020 |")
    assert "| 0.840 | 0.800 ± 0.010 |" in lines[2]
    with pytest.raises(SystemExit):
        report.main(["demo-none", "--cv"])
