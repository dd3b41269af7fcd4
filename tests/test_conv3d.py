"""conv3d.py: parameter counts by hand, memory accounting, sliding windows, a tracked 3D run."""

import keras
import mlflow.keras
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from helpers import blob, run_predict, write_anisotropic_folder, write_volume
from scipy import ndimage

import conv3d
import unet
from tp4.images import geometry
from tp4.perf import memory


@pytest.mark.parametrize("k, c_in, c_out", [(3, 1, 8), (3, 16, 32), (2, 4, 4)])
def test_one_conv3d_layer_has_k_cubed_weights_per_channel_pair(k, c_in, c_out):
    layer = keras.layers.Conv3D(c_out, k)
    layer.build((None, 8, 8, 8, c_in))
    assert layer.count_params() == k**3 * c_in * c_out + c_out


def test_comparison_table_comes_from_real_layers():
    table = memory.conv2d_vs_conv3d(c_in=16, c_out=32, size=64, depth_slices=32, kernel=3)
    assert table["weights per kernel and channel pair"] == (9, 27)
    assert table["parameters of one layer 16->32"] == (9 * 16 * 32 + 32, 27 * 16 * 32 + 32)


def test_3d_unet_shapes_and_refusals():
    model = unet.build_unet3d((8, 16, 16, 1), base_filters=4, depth=2)
    assert model.output_shape == (None, 8, 16, 16, 1)
    first = model.get_layer("enc1_conv1")
    assert isinstance(first, keras.layers.Conv3D) and first.count_params() == 27 * 1 * 4
    with pytest.raises(ValueError, match="not divisible"):
        unet.build_unet3d((10, 16, 16, 1), depth=3)
    with pytest.raises(ValueError, match=r"\(D, H, W, C\)"):
        unet.build_unet3d((16, 16, 1))


def test_activation_bytes_follow_the_layer_shapes():
    inputs = keras.Input((4, 8, 8, 1))
    model = keras.Model(inputs, keras.layers.Conv3D(2, 3, padding="same")(inputs))
    # input 4*8*8*1 + output 4*8*8*2 float32 values, times a batch of 3
    assert memory.activation_bytes(model, batch_size=3) == 3 * 4 * (256 + 512)


def test_memory_grows_with_filters_slices_and_shrinks_with_16_bit_floats():
    rows = {
        row["lever"]: row
        for row in memory.measure_levers((16, 16, 16), filters=8, depth=2, peak_memory=False)
    }
    base = rows["baseline (k=3, all filters, all slices, fp32)"]
    assert rows["half the filters"]["activation_mb"] < base["activation_mb"]
    assert rows["half the slices (D/2)"]["activation_mb"] == pytest.approx(
        base["activation_mb"] / 2
    )
    assert rows["kernel 2x2x2"]["params"] < base["params"]
    mixed = next(row for label, row in rows.items() if label.startswith("mixed precision"))
    assert mixed["activation_mb"] < 0.6 * base["activation_mb"]
    bigger = unet.build_unet3d((16, 16, 16, 1), base_filters=16, depth=2)
    assert memory.activation_bytes(bigger) > memory.activation_bytes(
        unet.build_unet3d((16, 16, 16, 1), 8, 2)
    )


def test_lever_note_states_measured_memory_not_only_the_counted_one(capsys):
    def row(lever, activation_mb, step_mb, step_seconds):
        measured = {"peak_rss_mb": 800 + step_mb, "step_mb": step_mb, "step_seconds": step_seconds}
        return {"lever": lever, "params": 10, "activation_mb": activation_mb, **measured}

    rows = [row("baseline", 156.2, 203, 0.16), row("mixed precision", 79.1, 227, 0.12)]
    memory.print_levers(rows, batch=2)
    note = capsys.readouterr().out.splitlines()[-1]
    assert note == (
        "note: mixed precision is 1.3x faster than fp32 on this machine, and its step "
        "measured 24 MB more memory for half the counted activations"
    )


@pytest.fixture(scope="module")
def small_model():
    keras.utils.set_random_seed(0)
    return unet.build_unet3d((8, 16, 16, 1), base_filters=4, depth=2)


@pytest.mark.parametrize("weighting", ["constant", "gaussian"])
def test_sliding_window_equals_direct_prediction_when_the_volume_fits(small_model, weighting):
    volume = np.random.default_rng(1).random((8, 16, 16, 1), dtype=np.float32)
    direct = small_model.predict(volume[None], verbose=0)[0]
    windowed = geometry.sliding_window_predict(
        small_model, volume, overlap=0.5, weighting=weighting
    )
    np.testing.assert_allclose(windowed, direct, atol=1e-5)


def test_sliding_window_covers_a_larger_volume_and_blends_exactly():
    # A 1x1x1 convolution sees one voxel: every patch agrees, so any blending must return the direct
    # output.
    inputs = keras.Input((4, 8, 8, 1))
    pointwise = keras.Model(inputs, keras.layers.Conv3D(1, 1, activation="sigmoid")(inputs))
    volume = np.random.default_rng(2).random((10, 21, 13, 1), dtype=np.float32)
    expected = keras.ops.convert_to_numpy(
        keras.activations.sigmoid(
            volume * pointwise.layers[1].kernel.numpy()[0, 0, 0] + pointwise.layers[1].bias.numpy()
        )
    )
    for weighting in ("constant", "gaussian"):
        out = geometry.sliding_window_predict(pointwise, volume, overlap=0.25, weighting=weighting)
        assert out.shape == (10, 21, 13, 1)
        np.testing.assert_allclose(out, expected, atol=1e-5)


def test_sliding_window_refuses_bad_volumes(small_model):
    with pytest.raises(ValueError, match="smaller than the model's patch"):
        geometry.sliding_window_predict(small_model, np.zeros((4, 16, 16, 1), np.float32))
    with pytest.raises(ValueError, match="expected a"):
        geometry.sliding_window_predict(small_model, np.zeros((8, 16, 16), np.float32))
    with pytest.raises(ValueError, match="weighting"):
        geometry.patch_weights((4, 4, 4), "cosine")


@pytest.mark.slow
def test_tracked_3d_training_learns_and_logs_like_train_py(store):
    args = conv3d.parse_args(
        "--n-volumes 24 --shape 8 32 32 --depth 2 --base-filters 8 --foreground 0.1 --epochs 6 "
        "--patience 6 --batch-size 2 --seed 3 --precision float32 --xla off".split()
    )
    results = conv3d.train3d(args, memory_rows=[{"lever": "baseline", "params": 1}])
    run = store.search_runs([store.get_experiment_by_name("tp4-conv3d").experiment_id])[0]
    assert run.info.run_name == "Conv3D_Baseline" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["architecture"] == "UNet3D" and params["data_shape"] == "8x32x32x1"
    assert run.data.tags["speed_choice"] == "float32, XLA off (as asked)"
    dice = [m.value for m in store.get_metric_history(run.info.run_id, "dice")]
    assert len(dice) == results["epochs_run"] and dice[-1] > dice[0] + 0.2, dice
    assert run.data.metrics["test_dice"] == pytest.approx(results["test_dice"])
    assert results["test_dice"] > 0.5
    artifacts = {a.path for a in store.list_artifacts(run.info.run_id)}
    expected = {"config.json", "model_config.json", "memory_levers.json", "test_predictions.png"}
    assert expected | {"training_curves.png"} <= artifacts


@pytest.mark.slow
def test_2d_slices_baseline_uses_the_same_volumes_and_split(store):
    args = conv3d.parse_args(
        "--n-volumes 12 --shape 8 32 32 --depth 2 --epochs 2 --seed 3 --precision float32 "
        "--slice-xla off".split()
    )
    results = conv3d.train_on_slices(args)
    run = store.search_runs([store.get_experiment_by_name("tp4-conv3d").experiment_id])[0]
    assert run.info.run_name == "UNet2D_Slices"
    assert run.data.params["architecture"] == "UNet2D on slices"
    assert (
        run.data.params["data_split"] == "8/2/2"
    )  # volumes, split exactly as the 3D run splits them
    assert 0 <= results["test_dice"] <= 1


@pytest.mark.slow
def test_peak_memory_is_the_child_process_own_not_its_large_parent():
    spec = dict(shape=[8, 16, 16], filters=4, depth=2, kernel=3, batch=1, policy="float32")
    ballast = np.ones(2**31 // 8)  # 2 GiB in this (parent) process, touched
    peak = memory.measure_in_subprocess(spec)["peak_rss_mb"]
    assert 0 < peak < 1500, peak  # a tiny model's step: the framework, well under the parent's size
    del ballast


@pytest.mark.slow
def test_3d_deep_supervision_and_residual_encoder_train_and_log_one_output(store):
    args = conv3d.parse_args(
        "--n-volumes 12 --shape 8 32 32 --depth 3 --base-filters 4 --epochs 2 --batch-size 2 "
        "--seed 3 --precision float32 --xla off --deep-supervision --encoder residual".split()
    )
    results = conv3d.train3d(args)
    run = store.search_runs([store.get_experiment_by_name("tp4-conv3d").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert (run.data.params["encoder"], run.data.params["deep_supervision"]) == ("residual", "2")
    model = mlflow.keras.load_model(results["model_uri"])
    assert len(model.outputs) == 1 and model.output_shape == (None, 8, 32, 32, 1)


@pytest.mark.slow
def test_3d_cross_validation_folds_whole_volumes_under_one_parent(store):
    conv3d.main(
        "--n-volumes 12 --shape 8 32 32 --depth 2 --epochs 1 --seed 3 --precision float32 "
        "--xla off --no-system-metrics --folds 2".split()
    )
    everything = store.search_runs([store.get_experiment_by_name("tp4-conv3d").experiment_id])
    (parent,) = [r for r in everything if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in everything if r is not parent]
    assert parent.info.run_name.endswith("_cv2") and parent.data.params["architecture"] == "UNet3D"
    assert len(children) == 2 and {r.info.status for r in everything} == {"FINISHED"}
    assert {r.data.params["data_shape"] for r in children} == {"8x32x32x1"}
    dice = [r.data.metrics["test_dice"] for r in children]
    assert parent.data.metrics["test_dice_mean"] == pytest.approx(np.mean(dice))
    oof = mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/oof_cases.json")
    # The 10 training + validation volumes of the 12 (8/2/2), each held out once, whole.
    assert sorted(row[1] for row in oof["data"]) == [f"case_{i:03d}" for i in range(10)]


def test_3d_cross_validation_refuses_what_trains_other_models_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        conv3d.parse_args(["--folds", "--compare-2d"])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith(
            "--folds and --fold train K 3D models: not with --compare-2d, --skip-training or "
            "--save-model"
        )
    )


@pytest.mark.slow
def test_a_dicom_series_an_nrrd_and_an_mha_train_and_predict_on_their_own_grids(
    tmp_path, store, capsys
):
    """conv3d.py --data-dir on one case of each format (imagesTr/labelsTr), then predict.py on each
    with the saved model: every mask has its input's size, spacing, origin and direction."""
    rng = np.random.default_rng(0)
    images, shape = [], (32, 32, 8)
    for i, (ext, label_ext) in enumerate([("", ".nrrd"), (".nrrd", ".nrrd"), (".mha", ".mha")]):
        label = blob(shape, rng)
        image = (rng.normal(0, 50, shape) + 400.0 * label).astype(np.int16)
        images.append(write_volume(tmp_path / "data" / "imagesTr" / f"case_{i}_0000{ext}", image))
        (tmp_path / "data" / "labelsTr").mkdir(exist_ok=True)
        write_volume(tmp_path / "data" / "labelsTr" / f"case_{i}{label_ext}", label)
    model = tmp_path / "model.keras"
    conv3d.main(
        f"--data-dir {tmp_path / 'data'} --shape 8 16 16 --depth 2 --base-filters 4 --epochs 1 "
        f"--batch-size 2 --seed 1 --precision float32 --xla off --no-system-metrics "
        f"--experiment tiny --save-model {model}".split()
    )
    run = store.search_runs([store.get_experiment_by_name("tiny").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.params["data_files"] == "3"
    assert run.data.params["data_orientation"] == "RAS (closest canonical), stored 3 ALS"
    capsys.readouterr()
    args = [str(model), *map(str, images), "--output", str(tmp_path / "out")]
    code, out, err = run_predict(args, capsys)
    assert code == 0 and len(out) == 3, err
    for image, suffix in zip(images, [".nrrd", ".nrrd", ".mha"]):
        series = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(image)) if image.is_dir() else ()
        scan = sitk.ReadImage(series or str(image))
        mask = sitk.ReadImage(str(tmp_path / "out" / f"{image.name.split('.')[0]}_mask{suffix}"))
        assert mask.GetSize() == scan.GetSize() and mask.GetPixelID() == sitk.sitkUInt8
        for get in ("GetSpacing", "GetOrigin", "GetDirection"):
            np.testing.assert_allclose(getattr(mask, get)(), getattr(scan, get)(), atol=1e-6)


@pytest.mark.slow
def test_plan_auto_trains_on_resampled_cases_and_predicts_back_on_the_input_grid(
    tmp_path, store, capsys
):
    """conv3d.py --plan auto on cases of 1 x 1 x 3 mm and one of 0.5 x 0.5 x 3 mm (resampled to the
    others'): it learns, logs plan.json and plan_* params (its --batch-size kept), and predict.py
    with the saved model resamples a 0.5 mm volume to the plan, predicts, and writes the mask on
    that volume's own grid, equal to the same steps done by hand with scipy."""
    spacings = [(1.0, 1.0, 3.0)] * 7 + [(0.5, 0.5, 3.0)]
    write_anisotropic_folder(tmp_path / "data", spacings, seed=2)
    model_path = tmp_path / "model.keras"
    conv3d.main(
        f"--data-dir {tmp_path / 'data'} --plan auto --batch-size 2 --base-filters 8 --epochs 8 "
        f"--patience 8 --lr 1e-2 --seed 1 --precision float32 --xla off --no-system-metrics "
        f"--experiment tiny --save-model {model_path}".split()
    )
    run = store.search_runs([store.get_experiment_by_name("tiny").experiment_id])[0]
    planned = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/plan.json")
    params = run.data.params
    assert planned["target_spacing"] == [1.0, 1.0, 3.0] and planned["patch"] == [32, 32, 8]
    assert params["plan_patch"] == "32x32x8" and params["plan_target_spacing"] == "1x1x3"
    assert params["data_shape"] == "8x32x32x1" and params["batch_size"] == "2"  # the flag kept
    assert params["plan_batch_size"] == str(planned["batch_size"]) != "2"
    assert run.data.metrics["test_dice"] > 0.6, run.data.metrics

    rng = np.random.default_rng(5)
    label = np.zeros((64, 64, 8), np.uint8)
    label[16:40, 20:48, 2:6] = 1
    image = (rng.normal(100, 10, label.shape) + 100.0 * label).astype(np.float32)
    affine = np.diag([0.5, 0.5, 3.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 2.0]
    scan = write_volume(tmp_path / "scan.nii.gz", image, affine)
    capsys.readouterr()
    code, out, err = run_predict([str(model_path), str(scan), "--output", str(tmp_path)], capsys)
    assert code == 0 and "the model's plan: each volume resampled to 1 x 1 x 3 mm" in out[0], err
    written = nib.load(tmp_path / "scan_mask.nii.gz")
    assert written.shape == image.shape
    np.testing.assert_allclose(written.affine, affine)
    resampled = ndimage.zoom(image, (0.5, 0.5, 1), order=3, grid_mode=True, mode="nearest")
    normalized = (resampled - resampled.mean()) / resampled.std()
    model = keras.models.load_model(model_path)
    network_input = np.moveaxis(normalized, -1, 0)[None, ..., None]  # (D, H, W) = (Z, X, Y)
    probability = np.moveaxis(model.predict(network_input, verbose=0)[0, ..., 0], 0, -1)
    back = ndimage.zoom(probability, (2, 2, 1), order=1, grid_mode=True, mode="nearest")
    reference = (back >= 0.5).astype(np.uint8)
    mask = np.asarray(written.dataobj)
    assert np.mean(mask != reference) < 1e-3 and reference.sum() > 0
