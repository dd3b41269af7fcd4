"""predict.py: masks in the input's geometry from a .keras file or an MLflow URI; bad inputs."""

import os

import keras
import mlflow
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from helpers import AFFINE, from_ras, ras, run_predict, write_volume
from PIL import Image

import data
import losses
import unet
from tp4.images import geometry, volumes
from tp4.images.imagefiles import DataError
from tp4.inference import outputs, segment
from tp4.models import batchnorm
from tp4.perf import hardware, speed


def _save(model, path):
    # Compiled with the project's loss and metrics: reloading needs them registered (predict imports
    # metrics). One training step on an empty batch builds the optimizer, as in a trained model,
    # with tiny weight changes.
    model.compile("adam", losses.BCEDiceLoss(), metrics=[losses.DiceMetric()])
    blank = np.zeros((1, *model.input_shape[1:]), np.float32)
    model.train_on_batch(blank, blank)
    model.save(path)
    return str(path)


@pytest.fixture(scope="module")
def model_2d(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = unet.build_unet((32, 32, 1), 8, 3)
    return model, _save(model, tmp_path_factory.mktemp("models") / "unet2d.keras")


@pytest.fixture(scope="module")
def model_3d(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = unet.build_unet3d((8, 16, 16, 1), base_filters=4, depth=2)
    return model, _save(model, tmp_path_factory.mktemp("models") / "unet3d.keras")


def _grey(shape, seed=0, dtype=np.uint8, high=256):
    return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def _volume(path, shape, seed=0):
    array = np.random.default_rng(seed).random(shape).astype(np.float32) * 500
    nib.save(nib.Nifti1Image(array, AFFINE), path)
    return array


def _binary(path, values):
    mask = np.asarray(Image.open(path))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= set(values), path
    return mask


def test_png_jpeg_tiff_folder_gives_masks_of_each_input_size(model_2d, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    sizes = {
        "square.png": (32, 32),
        "tall.png": (50, 20),
        "small.png": (20, 24),
        "photo.jpg": (30, 40),
        "deep.tif": (45, 30),
    }
    for name, (h, w) in sizes.items():
        deep = name.endswith(".tif")
        Image.fromarray(
            _grey((h, w), dtype=np.uint16 if deep else np.uint8, high=60000 if deep else 256)
        ).save(inputs / name)
    code, out, err = run_predict(
        [model_2d[1], str(inputs), "--output", str(tmp_path / "out")], capsys
    )
    assert (
        code == 0
        and err == []
        and len(out) == len(sizes)
        and all("foreground" in line for line in out)
    )
    expected = {
        "square.png": "square_mask.png",
        "tall.png": "tall_mask.png",
        "small.png": "small_mask.png",
        "photo.jpg": "photo_mask.png",
        "deep.tif": "deep_mask.tif",
    }  # JPEG in, PNG mask out: lossless
    for name, (h, w) in sizes.items():
        mask = _binary(tmp_path / "out" / expected[name], (0, 255))
        assert mask.shape == (h, w), name
        picture = Image.open(
            tmp_path
            / "out"
            / expected[name]
            .replace("_mask.png", "_overlay.png")
            .replace("_mask.tif", "_overlay.png")
        )
        assert picture.mode == "RGB" and picture.size == (w, h)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        list(expected.values()) + [n.split(".")[0] + "_overlay.png" for n in sizes]
    )


@pytest.mark.parametrize("shape", [(32, 32), (20, 24)])  # as the network takes it; smaller: padded
def test_a_png_mask_is_the_models_output_on_the_normalized_image(model_2d, tmp_path, capsys, shape):
    model, path = model_2d
    image = _grey(shape, seed=3)
    Image.fromarray(image).save(tmp_path / "x.png")
    assert (
        run_predict([path, str(tmp_path / "x.png"), "--output", str(tmp_path / "out")], capsys)[0]
        == 0
    )
    mask = _binary(tmp_path / "out" / "x_mask.png", (0, 255))
    fitted, transform = geometry.fit(
        data.normalize_intensity(image.astype(np.float32))[..., None], (32, 32)
    )
    probabilities = geometry.unfit(model.predict(fitted[None], verbose=0)[0, ..., 0], transform)
    clear = (
        np.abs(probabilities - 0.5) > 1e-4
    )  # leave out pixels within float noise of the threshold
    np.testing.assert_array_equal(mask[clear], np.where(probabilities >= 0.5, 255, 0)[clear])


@pytest.mark.slow
def test_a_bfloat16_model_with_fused_batch_norm_predicts_at_the_precision_chosen_here(
    tmp_path, capsys, monkeypatch
):
    keras.utils.set_random_seed(1)
    with speed.policy_scope("bfloat16"):
        trained = unet.build_unet((32, 32, 1), 8, 3, batch_norm=batchnorm.FusedBatchNormalization)
    path = _save(trained, tmp_path / "bf16.keras")
    # A CPU without bfloat16 arithmetic: the model predicts in float32, nothing measured.
    no_bfloat16 = {"kind": "cpu", "device": "a CPU", "flags": ["avx2"], "tensorflow": "2"}
    monkeypatch.setattr(hardware, "machine", lambda: {**no_bfloat16, "keras": "3"})

    def refuse(*args):
        raise AssertionError("predict.py measured")

    monkeypatch.setattr(speed, "measure_candidates", refuse)
    monkeypatch.setattr(hardware, "bfloat16_speedup", refuse)
    image = _grey((32, 32), seed=5)
    Image.fromarray(image).save(tmp_path / "x.png")
    args = [path, str(tmp_path / "x.png"), "--output", str(tmp_path / "out"), "--precision", "auto"]
    code, out, _ = run_predict(args, capsys)
    assert code == 0
    assert out[-2] == (
        "precision and XLA for this inference: float32, XLA off (the model's bfloat16 is not "
        "native here)"
    )
    # The bfloat16 model's weights, predicting in float32: its mask.
    normalized = data.normalize_intensity(image.astype(np.float32))[None, ..., None]
    with speed.policy_scope("float32"):
        expected = speed.recast(keras.models.load_model(path)).predict(normalized, verbose=0)
    clear = np.abs(expected[0, ..., 0] - 0.5) > 1e-4
    mask = _binary(tmp_path / "out" / "x_mask.png", (0, 255))
    np.testing.assert_array_equal(mask[clear], np.where(expected[0, ..., 0] >= 0.5, 255, 0)[clear])


def test_threshold_moves_the_foreground(model_2d, tmp_path, capsys):
    Image.fromarray(_grey((32, 32), seed=4)).save(tmp_path / "x.png")
    fractions = []
    for threshold in ("0.1", "0.9"):
        run_predict(
            [
                model_2d[1],
                str(tmp_path / "x.png"),
                "--output",
                str(tmp_path / threshold),
                "--threshold",
                threshold,
            ],
            capsys,
        )
        fractions.append((_binary(tmp_path / threshold / "x_mask.png", (0, 255)) > 0).mean())
    assert fractions[0] > fractions[1]


@pytest.mark.parametrize(
    "name, shape",
    [("scan.nii.gz", (40, 24, 5)), ("scan.nii", (20, 20, 3)), ("scan4d.nii.gz", (24, 24, 4, 1))],
)
def test_a_2d_model_segments_a_nifti_slice_by_slice_with_its_affine(
    model_2d, tmp_path, capsys, name, shape
):
    _volume(tmp_path / name, shape)
    code, out, _ = run_predict(
        [model_2d[1], str(tmp_path / name), "--output", str(tmp_path / "out")], capsys
    )
    assert code == 0 and len(out) == 1
    stem = name.split(".")[0]
    mask = nib.load(tmp_path / "out" / (stem + "_mask" + name[len(stem) :]))
    assert mask.shape == shape and mask.get_data_dtype() == np.uint8
    np.testing.assert_allclose(mask.affine, AFFINE)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    assert (tmp_path / "out" / f"{stem}_overlay.png").exists()


def test_a_2d_model_on_a_volume_normalizes_per_volume_then_predicts_each_slice(
    model_2d, tmp_path, capsys
):
    model, path = model_2d
    volume = _volume(tmp_path / "scan.nii.gz", (32, 32, 3))
    volume[..., 1] *= (
        10  # a bright slice: per-slice normalization would hide it, per-volume keeps it
    )
    nib.save(nib.Nifti1Image(volume, AFFINE), tmp_path / "scan.nii.gz")
    run_predict([path, str(tmp_path / "scan.nii.gz"), "--output", str(tmp_path / "out")], capsys)
    mask = np.asarray(nib.load(tmp_path / "out" / "scan_mask.nii.gz").dataobj)
    # The slices the network sees: the volume's in RAS order (stored ALS): (S, R, A, 1).
    slices = np.moveaxis(ras(data.normalize_intensity(volume)), -1, 0)[..., None]
    probabilities = np.moveaxis(model.predict(slices, verbose=0)[..., 0], 0, -1)
    probabilities = from_ras(probabilities)  # in the file's order, as the mask
    clear = np.abs(probabilities - 0.5) > 1e-4
    np.testing.assert_array_equal(mask[clear], (probabilities >= 0.5)[clear])


@pytest.mark.parametrize(
    "shape", [(20, 24, 10), (12, 12, 6)]
)  # larger than the 8x16x16 patch; smaller: padded
def test_a_3d_model_segments_through_the_sliding_window(model_3d, tmp_path, capsys, shape):
    _volume(tmp_path / "vol.nii.gz", shape)
    out = tmp_path / "out"
    code, printed, _ = run_predict(
        [model_3d[1], str(tmp_path / "vol.nii.gz"), "--output", str(out)], capsys
    )
    assert code == 0
    mask = nib.load(out / "vol_mask.nii.gz")
    assert mask.shape == shape
    z = segment.overlay_slice(np.asarray(mask.dataobj))  # AFFINE swaps X and Y, keeps Z
    shows = f"(axial slice {z} of {shape[-1]}, in RAS order)"
    assert any(  # every file written named, and the slice the overlay shows
        f"-> {out / 'vol_mask.nii.gz'} and {out / 'vol_overlay.png'} {shows}" in line
        for line in printed
    )
    np.testing.assert_allclose(mask.affine, AFFINE)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


def test_a_3d_prediction_keeps_the_slice_axis_last(model_3d, tmp_path, capsys):
    model, path = model_3d
    volume = _volume(
        tmp_path / "vol.nii.gz", (16, 16, 8)
    )  # (X, Y, Z) stored ALS, in RAS (16, 16, 8): exactly one patch (D, H, W) = (S, R, A)
    run_predict([path, str(tmp_path / "vol.nii.gz"), "--output", str(tmp_path / "out")], capsys)
    mask = np.asarray(nib.load(tmp_path / "out" / "vol_mask.nii.gz").dataobj)
    direct = model.predict(
        np.moveaxis(ras(data.normalize_intensity(volume)), -1, 0)[None, ..., None], verbose=0
    )[0, ..., 0]
    probabilities = from_ras(np.moveaxis(direct, 0, -1))  # in the file's order, as the mask
    clear = np.abs(probabilities - 0.5) > 1e-4
    np.testing.assert_array_equal(mask[clear], (probabilities >= 0.5)[clear])


def _lps_flipped():
    """An affine of an axial scan stored as DICOM does (LPS), x and z reversed: not AFFINE's ALS."""
    affine = np.diag([0.7, -0.7, -2.0, 1.0])
    affine[:3, 3] = (-40.0, 60.0, 30.0)
    return affine


@pytest.mark.parametrize("affine", [AFFINE, _lps_flipped()], ids=["ALS", "LPS flipped"])
def test_nrrd_mha_and_a_dicom_series_get_the_nifti_mask_on_their_own_grid(
    model_3d, tmp_path, capsys, affine
):
    """Read, predict, write: each mask has its input's geometry (to 1e-6) and marks the same voxels
    of the anatomy as the NIfTI path on the same data."""
    stored = np.random.default_rng(0).integers(-500, 1500, (16, 20, 10)).astype(np.int16)
    names = ["nifti.nii.gz", "nrrd.nrrd", "mha.mha", "mhd.mhd", "series"]
    inputs = [str(write_volume(tmp_path / n, stored, affine)) for n in names]
    code, out, err = run_predict([model_3d[1], *inputs, "--output", str(tmp_path / "out")], capsys)
    assert code == 0 and len(out) == len(names), err
    reference = np.asarray(nib.load(tmp_path / "out" / "nifti_mask.nii.gz").dataobj)
    assert 0 < reference.mean() < 1  # a mask with both classes: the comparison means something
    for path, mask_name in zip(inputs[1:4], ["nrrd_mask.nrrd", "mha_mask.mha", "mhd_mask.mha"]):
        image = sitk.ReadImage(path)
        mask = sitk.ReadImage(str(tmp_path / "out" / mask_name))
        assert mask.GetSize() == image.GetSize()
        for get in ("GetSpacing", "GetOrigin", "GetDirection"):
            np.testing.assert_allclose(getattr(mask, get)(), getattr(image, get)(), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(mask).transpose(), reference)
    series = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(inputs[-1]))
    mask = sitk.ReadImage(str(tmp_path / "out" / "series_mask.nrrd"))
    assert mask.GetSize() == series.GetSize()
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(mask, get)(), getattr(series, get)(), atol=1e-6)
    # The series, read by GDCM along its normal, may store z reversed: compare in RAS.
    series_mask = volumes.read(str(tmp_path / "out" / "series_mask.nrrd")).array
    np.testing.assert_array_equal(series_mask, ras(reference, affine))


def test_mlflow_model_uris(model_2d, store, tmp_path, capsys):
    Image.fromarray(_grey((32, 32))).save(tmp_path / "x.png")
    experiment = mlflow.create_experiment("predict", (tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        # Explicit requirements: inferring them would load the model again in a subprocess.
        info = mlflow.keras.log_model(
            model_2d[0],
            name="model",
            registered_model_name="tiny-unet",
            pip_requirements=[f"keras=={keras.__version__}"],
        )
    capsys.readouterr()  # MLflow's messages about registering the model
    uris = [f"runs:/{run.info.run_id}/model", "models:/tiny-unet/1", info.model_uri]
    for i, uri in enumerate(uris):
        output = str(tmp_path / f"out{i}")
        code, out, err = run_predict([uri, str(tmp_path / "x.png"), "--output", output], capsys)
        assert code == 0 and err == [], (uri, err)
        _binary(tmp_path / f"out{i}" / "x_mask.png", (0, 255))
    missing = "runs:/0123456789abcdef/model"
    code, _, err = run_predict(
        [missing, str(tmp_path / "x.png"), "--output", str(tmp_path / "bad")], capsys
    )
    assert code == 2 and len(err) == 1
    assert err[0].startswith("predict.py: error: cannot load the model runs:/")


# ------------------------------------------------------------------------------------------------
# Bad inputs: one line each, exit status 2, nothing half-written.


def test_a_missing_model_is_one_line_and_nothing_written(tmp_path, capsys):
    Image.fromarray(_grey((32, 32))).save(tmp_path / "x.png")
    code, out, err = run_predict(
        [str(tmp_path / "nope.keras"), str(tmp_path / "x.png"), "--output", str(tmp_path / "out")],
        capsys,
    )
    assert (
        code == 2
        and out == []
        and err == [f"predict.py: error: no such model file: {tmp_path / 'nope.keras'}"]
    )
    assert not (tmp_path / "out").exists()


def test_bad_files_are_reported_one_line_each_and_the_good_ones_still_done(
    model_2d, model_3d, tmp_path, capsys
):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(_grey((32, 32))).save(inputs / "good.png")
    Image.fromarray(_grey((32, 32))).save(inputs / "broken.png")
    (inputs / "broken.png").write_bytes((inputs / "broken.png").read_bytes()[:60])
    Image.fromarray(_grey((32, 32, 3))).save(inputs / "colour.png")
    missing = str(tmp_path / "missing.png")
    code, out, err = run_predict(
        [model_2d[1], str(inputs), missing, "--output", str(tmp_path / "out")], capsys
    )
    assert code == 2 and len(out) == 1 and out[0].startswith(str(inputs / "good.png"))
    assert len(err) == 3 and all(line.startswith("predict.py: error: ") for line in err)
    assert "broken.png" in err[0] and "cannot read" in err[0]
    assert "colour.png" in err[1] and "3 colour channels" in err[1]
    assert err[2] == f"predict.py: error: no such file: {missing}"
    assert sorted(os.listdir(tmp_path / "out")) == ["good_mask.png", "good_overlay.png"]

    code, _, err = run_predict(
        [model_3d[1], str(inputs / "good.png"), "--output", str(tmp_path / "out3d")], capsys
    )
    assert code == 2 and len(err) == 1 and "a 3D model segments volumes" in err[0]


def test_a_failure_while_writing_leaves_no_partial_file(model_2d, tmp_path, capsys, monkeypatch):
    _volume(tmp_path / "scan.nii.gz", (32, 32, 3))

    def full_disk(path, mask, nifti):
        with open(path, "wb") as f:
            f.write(b"half a mask")
        raise OSError("No space left on device")

    monkeypatch.setattr(outputs, "save_mask", full_disk)
    code, out, err = run_predict(
        [model_2d[1], str(tmp_path / "scan.nii.gz"), "--output", str(tmp_path / "out")], capsys
    )
    assert code == 2 and out == [] and err == ["predict.py: error: No space left on device"]
    assert os.listdir(tmp_path / "out") == []


def test_inputs_that_would_share_an_overlay_are_refused_too(tmp_path):
    outputs.refuse_shared_outputs(["x/a.png", "x/b.png", "y/c.nii.gz"], str(tmp_path))
    with pytest.raises(DataError, match=r"x/a.png and y/a.nii.gz would both write .*a_overlay.png"):
        outputs.refuse_shared_outputs(["x/a.png", "y/a.nii.gz"], str(tmp_path))


def test_two_inputs_that_would_write_the_same_mask_are_refused_before_anything(
    model_2d, tmp_path, capsys
):
    Image.fromarray(_grey((32, 32))).save(tmp_path / "a.png")
    Image.fromarray(_grey((32, 32))).convert("RGB").save(tmp_path / "a.jpg")
    code, _, err = run_predict(
        [
            model_2d[1],
            str(tmp_path / "a.png"),
            str(tmp_path / "a.jpg"),
            "--output",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert (
        code == 2
        and len(err) == 1
        and "would both write" in err[0]
        and not (tmp_path / "out").exists()
    )


# ------------------------------------------------------------------------------------------------
# Test-time mirroring and label maps of several classes.


def _by_hand_mirrored(model, image):
    """The mean of the model's outputs over the 4 flips of one (H, W, C) image, each undone."""
    unflipped = []
    for axes in ((), (0,), (1,), (0, 1)):
        flipped = np.flip(image, axes)[None].copy()
        unflipped.append(np.flip(model.predict(flipped, verbose=0)[0], axes))
    return np.mean(unflipped, axis=0)


def test_tta_mask_is_the_thresholded_mean_of_the_four_flips(model_2d, tmp_path, capsys):
    model, path = model_2d
    image = _grey((20, 24), seed=6)
    Image.fromarray(image).save(tmp_path / "x.png")
    code, _, err = run_predict(
        [path, str(tmp_path / "x.png"), "--output", str(tmp_path / "out"), "--tta"], capsys
    )
    assert code == 0 and err == []
    mask = _binary(tmp_path / "out" / "x_mask.png", (0, 255))
    fitted, transform = geometry.fit(
        data.normalize_intensity(image.astype(np.float32))[..., None], (32, 32)
    )
    probabilities = geometry.unfit(_by_hand_mirrored(model, fitted)[..., 0], transform)
    clear = np.abs(probabilities - 0.5) > 1e-4
    np.testing.assert_array_equal(mask[clear], np.where(probabilities >= 0.5, 255, 0)[clear])


@pytest.fixture(scope="module")
def model_3_classes(tmp_path_factory):
    keras.utils.set_random_seed(1)
    model = unet.build_unet((32, 32, 1), 4, 2, num_classes=3)  # uncompiled: saved and read faster
    path = tmp_path_factory.mktemp("models") / "unet3.keras"
    model.save(path)
    return model, str(path)


def test_a_model_of_three_classes_writes_label_maps(model_3_classes, tmp_path, capsys):
    model, path = model_3_classes
    image = _grey((20, 24), seed=7)
    Image.fromarray(image).save(tmp_path / "x.png")
    _volume(tmp_path / "scan.nii.gz", (32, 32, 3))
    code, _, err = run_predict(
        [
            path,
            str(tmp_path / "x.png"),
            str(tmp_path / "scan.nii.gz"),
            "--output",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 0 and err == []
    labels = np.asarray(Image.open(tmp_path / "o" / "x_mask.png"))  # the labels themselves
    fitted, transform = geometry.fit(
        data.normalize_intensity(image.astype(np.float32))[..., None], (32, 32)
    )
    probabilities = geometry.unfit(model.predict(fitted[None], verbose=0)[0], transform)
    top2 = np.sort(probabilities, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-4  # leave out near-ties
    np.testing.assert_array_equal(labels[clear], probabilities.argmax(-1)[clear])
    assert labels.shape == (20, 24) and set(np.unique(labels)) <= {0, 1, 2}
    volume = nib.load(tmp_path / "o" / "scan_mask.nii.gz")
    assert volume.shape == (32, 32, 3) and volume.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(volume.dataobj))) <= {0, 1, 2}
    np.testing.assert_allclose(volume.affine, AFFINE)
    assert Image.open(tmp_path / "o" / "x_overlay.png").size == (24, 20)


def test_swapped_arguments_and_a_mistyped_input_are_one_line_before_any_loading(tmp_path, capsys):
    Image.fromarray(_grey((32, 32))).save(tmp_path / "scan.png")
    broken_model = tmp_path / "unet.keras"
    broken_model.write_bytes(b"not a model")  # loading it would fail: the inputs are checked first
    code, _, err = run_predict([str(tmp_path / "scan.png"), str(broken_model)], capsys)
    assert code == 2 and err == [
        f"predict.py: error: {tmp_path / 'scan.png'} is not a model: give a .keras or .onnx "
        "file, an MLflow model folder, or a runs:/ or models:/ URI (the model comes first, then "
        "the images)"
    ]
    code, _, err = run_predict([str(broken_model), str(tmp_path / "scna.png")], capsys)
    assert code == 2 and err == [f"predict.py: error: no such file: {tmp_path / 'scna.png'}"]


def test_predicting_into_the_input_folder_never_segments_or_replaces_its_own_outputs(
    model_2d, tmp_path, capsys
):
    folder = tmp_path / "scans"
    folder.mkdir()
    Image.fromarray(_grey((32, 32))).save(folder / "a.png")
    command = [model_2d[1], str(folder), "--output", str(folder)]
    code, out, err = run_predict(command, capsys)  # nothing to collide with: allowed
    assert code == 0 and err == [] and len(out) == 1 and out[0].startswith(str(folder / "a.png"))
    written = {n: (folder / n).read_bytes() for n in ("a_mask.png", "a_overlay.png")}
    code, out, err = run_predict(command, capsys)  # the same again: a_mask.png is there now
    assert code == 2 and len(err) == 1 and "is already there" in err[0]
    assert {n: (folder / n).read_bytes() for n in written} == written
    code, out, err = run_predict(
        [model_2d[1], str(folder), "--output", str(tmp_path / "o")], capsys
    )
    assert code == 0 and "left out 2 file(s)" in out[0] and len(out) == 2  # a.png only
    assert sorted(os.listdir(tmp_path / "o")) == ["a_mask.png", "a_overlay.png"]
