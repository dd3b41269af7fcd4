"""train.py end to end on a tiny configuration, checked in MLflow with MlflowClient."""

import keras
import mlflow
import mlflow.keras
import nibabel as nib
import numpy as np
import pytest
from helpers import TINY, run_predict, write_anisotropic_folder, write_volume

import conv3d
import data
import losses
import metrics
import train
from tp4.images import figures
from tp4.inference import segment
from tp4.perf import hardware, speed
from tp4.tracking import epochs
from tp4.training import grid, recipe


def _only_run(client):
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_tracked_run_has_params_epoch_metrics_artifacts_and_a_reloadable_model(store):
    results = train.train(train.parse_args(TINY + ["--loss", "dice", "--optimizer", "sgd"]))
    model = mlflow.keras.load_model(results["model_uri"])
    run = _only_run(store)
    assert run.info.run_name == "UNet_DiceLoss_SGD" and run.info.status == "FINISHED"
    p = run.data.params
    assert (p["architecture"], p["loss"], p["optimizer"], p["learning_rate"]) == (
        "UNet",
        "DiceLoss",
        "SGD",
        "0.01",
    )
    assert (p["depth"], p["base_filters"], p["n_params"]) == ("3", "8", str(model.count_params()))
    assert (p["data_split"], p["data_shape"], p["seed"]) == ("28/6/6", "32x32x1", "1")
    images, masks = data.make_synthetic_2d(40, 32, seed=1, foreground=0.1)
    assert p["data_hash"] == data.content_hash(images, masks)
    (logged,) = mlflow.get_run(run.info.run_id).inputs.dataset_inputs  # the runs table's Dataset
    assert (logged.dataset.name, logged.dataset.digest) == ("synthetic-2d seed 1", p["data_hash"])
    assert [tag.value for tag in logged.tags] == ["training"]

    epochs = results["epochs_run"]
    for key in (
        "loss",
        "dice",
        "iou",
        "val_loss",
        "val_dice",
        "val_iou",
        "lr",
        "epoch_seconds",
        "images_per_second",
    ):
        history = store.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == list(range(1, epochs + 1)), key
    for key in ("test_dice", "test_iou", "test_loss", "test_dice_per_image", "best_epoch"):
        assert run.data.metrics[key] == pytest.approx(results[key])
    for key in ("test_hd95", "test_nsd", "test_one_empty"):
        assert run.data.metrics[key] == pytest.approx(results[key], nan_ok=True)
    assert (p["num_classes"], p["tta"], p["nsd_tolerance"], p["data_spacing"]) == (
        "2",
        "False",
        "1.0",
        "1x1 px",
    )

    artifacts = {a.path for a in store.list_artifacts(run.info.run_id)}
    assert {
        "config.json",
        "model_config.json",
        "training_curves.png",
        "test_predictions.png",
        "test_cases.json",
    } <= artifacts
    config = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/config.json")
    # The configuration as resolved: sgd's usual learning rate, the run's name, no "auto" left.
    assert (config["lr"], config["run_name"]) == (0.01, "UNet_DiceLoss_SGD")
    # Epoch 1 starts at the cosine schedule's peak.
    assert store.get_metric_history(run.info.run_id, "lr")[0].value == pytest.approx(0.01)
    assert (config["precision"], config["xla"]) == ("float32", False)
    table = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/test_cases.json")
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert len(rows) == 6 and [r["case"] for r in rows] == [str(i) for i in range(6)]

    # The logged model (MLflow 3: outside the run's artifacts, at models:/<id>) predicts as the
    # trained one.
    x_test, y_test = data.split(images, masks, seed=1)["test"]
    logged = mlflow.keras.load_model(run.data.tags["model_uri"])
    np.testing.assert_allclose(
        logged.predict(x_test, verbose=0), model.predict(x_test, verbose=0), atol=1e-6
    )
    # As a service (tp4/serving): a raw image in, its mask out, by predict.py's code.
    pyfunc = mlflow.pyfunc.load_model(run.data.tags["model_uri"])
    assert pyfunc.metadata.get_output_schema().inputs[0].shape == (-1, -1)
    raw = x_test[0, ..., 0] * 1000
    expected = segment.segment_image(model, raw[..., None], threshold=0.3)[0]
    np.testing.assert_array_equal(pyfunc.predict(raw, params={"threshold": 0.3}), expected)

    # test_loss: the soft Dice loss over the whole test set, by hand.
    p = model.predict(x_test, verbose=0).astype(np.float64)
    overlap = (y_test * p).sum()
    expected = 1 - (2 * overlap + losses.EPSILON) / (y_test.sum() + p.sum() + losses.EPSILON)
    assert results["test_loss"] == pytest.approx(expected, rel=1e-4)
    for row, truth, probabilities in zip(rows, y_test, p):  # the per-case table, case by case
        assert row["dice"] == pytest.approx(metrics.dice_coefficient(truth, probabilities))
        assert row["true_voxels"] == truth.sum()


@pytest.mark.slow
def test_a_three_class_run_logs_per_class_metrics_and_learns(store):
    extra = [
        "--num-classes",
        "3",
        "--tta",
        "--nsd-tolerance",
        "2",
        "--epochs",
        "12",
        "--patience",
        "12",
    ]
    args = train.parse_args(TINY + extra)
    results = train.train(args)
    model = mlflow.keras.load_model(results["model_uri"])
    run = _only_run(store)
    assert model.output_shape == (None, 32, 32, 3) and run.data.params["num_classes"] == "3"
    logged = run.data.metrics
    for name in ("dice", "iou", "hd95", "nsd"):  # HD95: over the classes that have a value
        per_class = [v for v in (logged[f"test_{name}_class{c}"] for c in (1, 2)) if v == v]
        expected = np.mean(per_class) if per_class else float("nan")
        assert logged[f"test_{name}"] == pytest.approx(expected, nan_ok=True)
    val_dice = [m.value for m in store.get_metric_history(run.info.run_id, "val_dice")]
    assert val_dice[-1] > val_dice[0] + 0.1  # it learned (the mean Dice of the two lesion kinds)
    table = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/test_cases.json")
    assert [row[1] for row in table["data"][:4]] == [1, 2, 1, 2]  # a row per case and class


@pytest.mark.slow
def test_auto_precision_and_xla_are_measured_once_printed_and_logged(
    store, monkeypatch, tmp_path, capsys
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # bfloat16 units and no AVX-512: bfloat16 by its convolutions, XLA on and off timed.
    bfloat16_cpu = {
        "kind": "cpu",
        "device": "a CPU",
        "flags": ["amx_bf16"],
        "tensorflow": "2",
        "keras": "3",
    }
    monkeypatch.setattr(hardware, "machine", lambda: bfloat16_cpu)
    monkeypatch.setattr(hardware, "bfloat16_speedup", lambda: 4.0)
    asked = []

    def fake_probe(candidates, build, batch):
        asked.append((build().input_shape, batch, candidates))
        return {c: 40.0 if c == speed.Choice("bfloat16", False) else 10.0 for c in candidates}

    monkeypatch.setattr(speed, "measure_candidates", fake_probe)
    train.main(TINY[: TINY.index("--precision")] + ["--epochs", "1"])
    bfloat16 = [speed.Choice("bfloat16", False), speed.Choice("bfloat16", True)]
    assert asked == [((None, 32, 32, 1), 8, bfloat16)]
    out = capsys.readouterr().out
    assert "choosing precision and XLA for this machine: " in out
    assert "bfloat16, XLA on: 10.00 examples/s" in out and "XLA off: 40.00 examples/s" in out
    assert (
        "precision and XLA for this machine: bfloat16, XLA off (bfloat16 convolutions 4.0x" in out
    )
    assert " parameters, bfloat16, XLA off" in out  # the run's header line
    run = _only_run(store)
    assert (run.data.params["precision"], run.data.params["xla"]) == ("bfloat16", "False")
    # The printed reasons are the run's too.
    assert run.data.tags["speed_choice"].startswith("bfloat16, XLA off (bfloat16 convolutions 4.0x")
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_ctrl_c_marks_the_run_killed_and_keeps_its_metrics(store, monkeypatch):
    log_epoch = epochs.EpochLogger.on_epoch_end

    def interrupt_after_two_epochs(self, epoch, logs=None):
        log_epoch(self, epoch, logs)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(epochs.EpochLogger, "on_epoch_end", interrupt_after_two_epochs)
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY)
    assert exit_info.value.code == 130
    run = _only_run(store)
    assert run.info.status == "KILLED"
    assert len(store.get_metric_history(run.info.run_id, "val_dice")) == 2
    assert mlflow.active_run() is None


def test_an_exception_marks_the_run_failed(store, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(epochs.EpochLogger, "on_epoch_begin", broken)  # before any training step
    with pytest.raises(RuntimeError, match="disk full"):
        train.main(TINY + ["--epochs", "1"])
    assert _only_run(store).info.status == "FAILED"


def test_a_size_the_network_cannot_take_is_refused_before_any_run(store, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--image-size", "30"])
    assert exit_info.value.code == 2
    assert "not divisible by 2**(depth-1) = 4" in capsys.readouterr().err
    assert store.get_experiment_by_name("tiny") is None


def test_an_epoch_under_xla_takes_full_batches_only():
    xla, eager = (
        recipe.choose_speed(train.parse_args(["--precision", "float32", "--xla", xla]), None)
        for xla in ("on", "off")
    )
    assert (xla.xla, eager.xla) == (True, False)
    assert recipe.epoch_size(140, xla) == (
        17,
        136,
    )  # 140 = 17 x 8 + 4: the 4 wait for another epoch
    assert recipe.epoch_size(140, eager) == (18, 140)
    assert recipe.epoch_size(7, eager) == (1, 7)
    with pytest.raises(ValueError, match="--batch-size 8 is larger than the 7 training examples"):
        recipe.epoch_size(7, xla)


def test_a_batch_larger_than_the_training_set_is_refused_before_any_run(store, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--batch-size", "32", "--xla", "on"])  # 28 training images
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == "train.py: error: --batch-size 32 is larger than the 28 training examples"
    )
    assert store.get_experiment_by_name("tiny") is None


def test_an_unreachable_tracking_server_is_one_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow.set_tracking_uri("http://127.0.0.1:9")  # the discard port: nothing listens there
    try:
        with pytest.raises(SystemExit) as exit_info:
            train.main(TINY + ["--epochs", "1"])
    finally:
        mlflow.set_tracking_uri(None)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        "train.py: error: cannot use the MLflow tracking store http://127.0.0.1:9"
    )


def test_prediction_figure_shows_the_images_with_the_most_foreground():
    masks = np.zeros((3, 32, 32, 1), np.float32)
    for i, pixels in enumerate((1, 10, 5)):
        masks[i].flat[:pixels] = 1
    probabilities = np.ones_like(
        masks
    )  # Dice of image i: 2k / (k + 1024) for its k foreground pixels
    figure = figures.prediction_figure(np.zeros_like(masks), masks, probabilities, n=2)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == [f"Dice {2 * 10 / 1034:.3f}", f"Dice {2 * 5 / 1029:.3f}"]


def test_shard_1_of_3_runs_every_third_cell_from_the_second_and_3_shards_cover_the_grid():
    cells = grid.cells(train.parse_args(["--grid", "--shard", "1/3"]).shard)
    # The grid in order: bce x (adam, adamw, sgd, rmsprop), dice x (...), ...: cells 1, 4, ..., 22.
    assert cells == [
        ("bce", "adamw"),
        ("dice", "adam"),
        ("dice", "rmsprop"),
        ("bce_dice", "sgd"),
        ("tversky", "adamw"),
        ("focal_tversky", "adam"),
        ("focal_tversky", "rmsprop"),
        ("generalized_dice", "sgd"),
    ]
    shards = [grid.cells((i, 3)) for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(grid.cells())
    assert len(grid.cells()) == len(losses.LOSSES) * len(recipe.OPTIMIZERS) == 24


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--grid", "--shard", "3/3"], "argument --shard: '3/3': I/N needs 0 <= I < N"),
        (["--grid", "--shard", "1/0"], "argument --shard: '1/0': I/N needs 0 <= I < N"),
        (["--grid", "--shard", "1"], "argument --shard: '1' is not I/N, two whole numbers"),
        (["--grid", "--shard", "24/25"], "--shard 24/25: the grid has 24 cells"),
        (["--shard", "0/2"], "--shard goes with --grid"),
    ],
)
def test_a_bad_shard_is_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(flags)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"train.py: error: {message}"


@pytest.mark.parametrize("script", [train, conv3d])
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "-0.5"], "argument --lr: must be above 0, got -0.5"),
        (["--lr", "0"], "argument --lr: must be above 0, got 0"),
        (["--patience", "-2"], "argument --patience: must be at least 0, got -2"),
        (["--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
        (["--batch-size", "two"], "argument --batch-size: invalid int value: 'two'"),
        (["--nsd-tolerance", "-1"], "argument --nsd-tolerance: must be at least 0, got -1"),
    ],
)
def test_a_number_out_of_range_is_one_line_in_both_scripts(script, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(flags)
    assert exit_info.value.code == 2
    prog = f"{script.__name__}.py"
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"{prog}: error: {message}"


@pytest.mark.slow
def test_a_grid_shard_runs_its_cells_each_as_its_own_run_and_prints_their_table(store, capsys):
    train.main(TINY + ["--epochs", "1", "--grid", "--shard", "11/12"])
    runs = store.search_runs([store.get_experiment_by_name("tiny").experiment_id])
    names = {
        "UNet_CombinedLoss_RMSprop",
        "UNet_GeneralizedDiceLoss_RMSprop",
    }  # cells 11 and 23
    assert {run.info.run_name for run in runs} == names
    assert {run.info.status for run in runs} == {"FINISHED"}
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert sorted(line.split(" | ")[:2] for line in table[1:]) == [
        ["| CombinedLoss", "RMSprop"],
        ["| GeneralizedDiceLoss", "RMSprop"],
    ]


@pytest.mark.slow
def test_deep_supervision_and_residual_encoder_log_a_one_output_model(store, tmp_path):
    saved = tmp_path / "ds.keras"
    options = ["--deep-supervision", "--encoder", "residual", "--save-model", str(saved)]
    results = train.train(train.parse_args(TINY + options))
    run = _only_run(store)
    assert run.info.run_name == "ResEncUNet_CombinedLoss_Adam" and run.info.status == "FINISHED"
    p = run.data.params
    # depth 3: heads at 1 and 1/2 of the size, weighted 1 and 0 (nnU-Net's lowest level).
    assert (p["encoder"], p["deep_supervision"]) == ("residual", "2")
    for model in (mlflow.keras.load_model(results["model_uri"]), keras.models.load_model(saved)):
        assert len(model.outputs) == 1 and model.output_shape == (None, 32, 32, 1)
        # n_params is the trained network's: with the 1x1 head of the 16-filter level (16 + 1).
        assert model.count_params() == int(p["n_params"]) - 17
    dice = [m.value for m in store.get_metric_history(run.info.run_id, "dice")]
    assert len(dice) == results["epochs_run"] and 0 <= results["test_dice"] <= 1


@pytest.mark.slow
def test_plan_auto_plans_in_plane_logs_the_plan_and_predict_replays_it_from_the_run(
    store, tmp_path, capsys
):
    """train.py --plan auto on axial slices: the plan is in-plane (spacing and a square patch, as
    nnU-Net's 2D configuration), --batch-size given wins, plan.json and plan_* params are logged,
    and predict.py given the run's model (runs:/) resamples a coarser volume to the plan and
    writes its mask on that volume's own grid."""
    paths = write_anisotropic_folder(tmp_path / "data", [(1.0, 1.0, 3.0)] * 4, (24, 24, 6))
    argv = f"--data-dir {tmp_path / 'data'} --plan auto --batch-size 4 --base-filters 8 --epochs 1"
    train.main(argv.split() + "--seed 1 --experiment tiny --precision float32 --xla off".split())
    run = _only_run(store)
    params = run.data.params
    assert (params["plan_target_spacing"], params["plan_patch"]) == ("1x1", "24x24")
    assert params["data_shape"] == "24x24x1" and params["batch_size"] == "4"
    assert params["plan_batch_size"] == "16" and params["depth"] == params["plan_depth"]
    planned = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/plan.json")
    assert planned["dims"] == 2 and planned["chosen_image_size"] == 24
    coarse = np.asarray(nib.load(paths[0]).dataobj)[::2, ::2]  # 12 x 12 voxels of 2 mm
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    scan = write_volume(tmp_path / "coarse.nii.gz", coarse, affine)
    capsys.readouterr()
    model = f"runs:/{run.info.run_id}/model"
    code, out, err = run_predict([model, str(scan), "--output", str(tmp_path / "out")], capsys)
    assert code == 0 and "resampled to 1 x 1 mm" in out[0], err
    written = nib.load(tmp_path / "out" / "coarse_mask.nii.gz")
    assert written.shape == coarse.shape
    np.testing.assert_allclose(written.affine, affine)
