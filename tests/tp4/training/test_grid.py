"""train.py --grid --resume: the FINISHED cells kept, the interrupted one resumed, the rest run."""

import mlflow
import pytest
from helpers import TINY, refused_in_one_line

import train
from tp4.tracking import liveness
from tp4.training import grid


def _interrupted_run(store, loss, status="KILLED"):
    """A run of train.py killed after logging its params and config.json, before any epoch (or
    marked `status`)."""
    config = train.parse_args(TINY + ["--loss", loss, "--optimizer", "adam"])
    experiment_id = store.get_experiment_by_name("tiny").experiment_id  # made by cell 0's run
    with mlflow.start_run(experiment_id=experiment_id, tags={"mlflow.source.name": "train.py"}):
        mlflow.log_params({"loss": train.losses.LOSSES[loss].label, "optimizer": "Adam"})
        mlflow.log_dict(config.to_json(), liveness.CONFIGURATION)
        run_id = mlflow.active_run().info.run_id
    store.set_terminated(run_id, status)
    return run_id


def test_the_grid_resume_keeps_finished_cells_resumes_the_killed_one_and_runs_the_rest(
    store, capsys
):
    cells = grid.cells((0, 8))  # 3 cells: 3 losses, each with Adam
    assert [optimizer for _, optimizer in cells] == ["adam"] * 3 and cells[0][0] == "bce"
    first, second, third = (train.losses.LOSSES[loss].label for loss, _ in cells)
    train.main(TINY + ["--loss", "bce", "--optimizer", "adam"])  # cell 0 FINISHED
    killed = _interrupted_run(store, cells[1][0])  # cell 1
    capsys.readouterr()

    train.main(TINY + ["--grid", "--shard", "0/8", "--resume"])
    out = capsys.readouterr().out.splitlines()
    assert f"grid --resume: 1 finished: {first} x Adam" in out
    assert f"grid --resume: 1 resume: {second} x Adam (run {killed})" in out
    assert f"grid --resume: 1 never ran: {third} x Adam" in out
    experiment = store.get_experiment_by_name("tiny").experiment_id
    runs = store.search_runs([experiment])
    assert sorted((r.data.params["loss"], r.info.status) for r in runs) == sorted(
        [(first, "FINISHED"), (second, "FINISHED"), (third, "FINISHED")]
    )  # the finished cell not trained again, the killed one finished as the same run
    assert store.get_run(killed).info.status == "FINISHED"
    assert sum(line.startswith("| ") for line in out) == 1 + 3  # the table: header, every cell


@pytest.mark.parametrize("status", ["KILLED", "FINISHED"])
def test_a_grid_resume_that_changes_the_cells_settings_is_refused_in_one_line(
    store, capsys, status
):
    mlflow.set_experiment("tiny")
    loss = grid.cells((0, 8))[1][0]
    run_id = _interrupted_run(store, loss, status)
    label = f"{train.losses.LOSSES[loss].label} x Adam"
    line = refused_in_one_line(
        TINY + ["--grid", "--shard", "0/8", "--resume", "--epochs", "5", "--experiment", "tiny"],
        capsys,
    )
    assert line == (
        "train.py: error: --grid --resume finishes the grid as it ran: --epochs 5 (the run has 3) "
        f"for cell {label} (run {run_id}); resume without changing them, or start a new "
        "--experiment"
    )
    assert len(store.search_runs([store.get_experiment_by_name("tiny").experiment_id])) == 1
    assert store.get_run(run_id).info.status == status  # nothing trained, nothing marked
