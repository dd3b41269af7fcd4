"""tp4/planning/auto.py: --plan auto's plan of written volumes, every flag given kept over it, the
cases resampled and normalized by it, the modality read from dataset.json, refusals."""

import numpy as np
import pytest
from helpers import write_anisotropic_folder, write_png_folder
from scipy import ndimage

import conv3d
import train
from tp4.images.imagefiles import DataError
from tp4.planning import auto, plan, preprocess
from tp4.training import config

SPACINGS = [(1.0, 1.0, 3.0), (1.0, 1.0, 3.0), (0.5, 0.5, 3.0), (1.0, 1.0, 3.0)]


def _configure(module, argv, field):
    settings = module.parse_args(argv)
    return auto.configure(settings, config.given(module.command_line(), argv), field)


def test_the_plan_sets_patch_batch_depth_and_a_given_flag_wins(tmp_path, capsys):
    write_anisotropic_folder(tmp_path, SPACINGS)
    base = ["--data-dir", str(tmp_path), "--plan", "auto"]
    planned = _configure(conv3d, base, "shape")
    measured = planned.planned
    assert measured["target_spacing"] == [1.0, 1.0, 3.0] and measured["cases"] == 4
    assert measured["median_shape"] == [32, 32, 8]  # the 0.5 mm case counts as 16 x 16 there
    x, y, z = measured["patch"]
    assert planned.shape == (z, x, y)  # the network's (D, H, W) = (Z, X, Y)
    assert planned.depth == measured["depth"] and planned.batch_size == measured["batch_size"]
    assert "plan (nnU-Net's rules" in capsys.readouterr().out
    given = _configure(conv3d, [*base, "--batch-size", "3", "--shape", "4", "16", "16"], "shape")
    assert given.batch_size == 3 and tuple(given.shape) == (4, 16, 16)
    assert given.depth == plan.depth_for((4, 16, 16)) == 1  # planned for the patch given
    assert "kept from the command line: --batch-size, --shape" in capsys.readouterr().out
    flat = _configure(train, [*base, "--depth", "2"], "image_size")  # 2D: in-plane, square
    assert flat.planned["target_spacing"] == [1.0, 1.0] and flat.depth == 2
    assert flat.image_size == flat.planned["patch"][0] == flat.planned["patch"][1]
    assert _configure(conv3d, ["--data-dir", str(tmp_path)], "shape").planned is None


def test_cases_are_resampled_and_normalized_by_the_plan(tmp_path):
    image = np.random.default_rng(0).normal(50, 5, (8, 8, 4)).astype(np.float32)
    labels = np.zeros((8, 8, 4), np.uint8)
    labels[2:6, 2:6, 1:3] = 1
    planned = {"target_spacing": [1.0, 1.0, 1.5], "normalization": {"scheme": "z-score"}}
    out, mask, spacing = auto.prepare_case(planned, image, labels, (1.0, 1.0, 3.0))
    reference = ndimage.zoom(image, (1, 1, 2), order=3, grid_mode=True, mode="nearest")
    np.testing.assert_allclose(out, (reference - reference.mean()) / reference.std(), atol=1e-4)
    one_hot = [
        ndimage.zoom((labels == c) * 1.0, (1, 1, 2), order=1, grid_mode=True, mode="nearest")
        for c in (0, 1)
    ]
    np.testing.assert_array_equal(mask, np.argmax(one_hot, axis=0))
    assert spacing.tolist() == [1.0, 1.0, 1.5] and mask.dtype == np.uint8
    flat = {"target_spacing": [0.5, 0.5], "normalization": {"scheme": "z-score"}}
    assert auto.prepare_case(flat, image, labels, (1.0, 1.0, 3.0))[0].shape == (16, 16, 4)
    assert preprocess.resample(labels, (1, 1, 3), (1, 1, 1.5), labels="nearest").shape == (8, 8, 8)


def test_the_modality_comes_from_dataset_json_unless_given(tmp_path):
    write_anisotropic_folder(tmp_path, SPACINGS[:3], modality="CT")
    ct = auto.make(str(tmp_path), None, 4, 3)
    assert ct["modality"] == "CT" and ct["normalization"]["scheme"] == "CT"
    low, high = ct["normalization"]["clip"]
    assert 150 < low < high < 250  # the boxes' intensities: 200 +- noise
    assert auto.make(str(tmp_path), "MR", 4, 3)["normalization"]["scheme"] == "z-score per image"
    (tmp_path / "dataset.json").write_text('{"channel_names": {"0": "MRI"}}')  # nnU-Net v2's
    assert auto.dataset_modality(str(tmp_path)) == "MRI"


def test_what_cannot_be_planned_is_refused_in_one_line(tmp_path):
    settings = conv3d.parse_args(["--plan", "auto"])
    with pytest.raises(DataError, match="--data-dir DIR or --dataset mni-wm"):
        auto.configure(settings, set(), "shape")
    write_png_folder(tmp_path / "png")
    with pytest.raises(DataError, match="holds 2D images"):
        auto.make(str(tmp_path / "png"), None, 4, 2)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="not a dataset description"):
        auto.dataset_modality(str(tmp_path / "bad"))
