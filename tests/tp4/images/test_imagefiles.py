"""Data that is wrong is refused in one line naming the file, before any MLflow run: a label off its
image in millimetres, no foreground to learn, images of a few pixels, inf voxels, broken links."""

import os
import re

import nibabel as nib
import numpy as np
import pytest
from helpers import AFFINE, TINY_REAL, refused_in_one_line, write_msd_folder, write_png_folder
from PIL import Image

import data
from tp4.images import datasets, imagefiles


def _label_affine(root, change):
    """Rewrite labelsTr/case_001 with its affine changed by `change(affine)`."""
    path = root / "labelsTr" / "case_001.nii.gz"
    label = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), change(AFFINE.copy())), path)


def _flipped(affine):
    # First voxel axis reversed. Both are compared on their RAS grids (a label may be stored in
    # another orientation than its image): there the label's axis is turned back, its origin moved
    # to the other end, 31 x 0.9 = 27.9 mm away, 34.875 of the smallest voxels (0.8 mm).
    affine[:, 0] *= -1
    return affine


def _shifted(affine):
    affine[:3, 3] += [0.0, 2.0, 0.0]  # origin 2 mm away
    return affine


def _no_foreground(root):
    for path in (root / "masks").iterdir():
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(path)


def _tiny_image(root):
    Image.fromarray(np.full((4, 32), 9, np.uint8)).save(root / "images" / "case1.png")
    Image.fromarray(np.zeros((4, 32), np.uint8)).save(root / "masks" / "case1.png")


def _inf_voxel(root):
    image = np.ones((32, 32, 8), np.float32)
    image[1, 2, 3] = -np.inf
    nib.save(nib.Nifti1Image(image, AFFINE), root / "imagesTr" / "case_000_0000.nii.gz")


def _dangling_link(root):
    (root / "images" / "case3.png").unlink()
    os.symlink(root / "moved" / "case3.png", root / "images" / "case3.png")


# layout, how to spoil a good folder, the one-line message expected (a regular expression)
BAD = {
    "label affine flipped": (
        "msd",
        lambda root: _label_affine(root, _flipped),
        r"image case_001_0000\.nii\.gz and its label case_001\.nii\.gz are not on the same grid: "
        r"their affines \(voxel to mm\) move voxels by up to 27\.9 mm \(34\.9 voxels\)",
    ),
    "label affine shifted": (
        "msd",
        lambda root: _label_affine(root, _shifted),
        r"image case_001_0000\.nii\.gz and its label case_001\.nii\.gz .* by up to 2 mm \(2\.5 ",
    ),
    "no foreground": (
        "png",
        _no_foreground,
        r"no foreground in the 2 training examples of .*data: every mask is empty",
    ),
    "tiny image": ("png", _tiny_image, r"images/case1\.png is 4x32: fewer than 8 pixels on a side"),
    "inf voxel": (
        "msd",
        _inf_voxel,
        r"case_000_0000\.nii\.gz contains non-finite values: 1 inf of 8192$",
    ),
    "dangling symlink": (
        "png",
        _dangling_link,
        r"images/case3\.png is a broken symbolic link \(to .*moved/case3\.png, which does not",
    ),
}


def make_bad(tmp_path, case):
    layout, spoil, _ = BAD[case]
    root = tmp_path / "data"
    (write_png_folder if layout == "png" else write_msd_folder)(root)
    spoil(root)
    return root


@pytest.mark.parametrize("case", sorted(BAD))
def test_train_refuses_wrong_data_in_one_line_exit_2_and_no_run(tmp_path, store, capsys, case):
    error = refused_in_one_line(TINY_REAL + ["--data-dir", str(make_bad(tmp_path, case))], capsys)
    assert re.search(BAD[case][2], error), error
    assert store.get_experiment_by_name("tiny") is None
    assert store.search_runs([e.experiment_id for e in store.search_experiments()]) == []


def test_affines_equal_up_to_float_noise_in_the_header_are_accepted(tmp_path):
    write_msd_folder(tmp_path)
    # The label's header keeps its geometry only as a qform (a float32 quaternion), as some tools
    # write it: its affine differs from the image's by float rounding, about 3e-8 mm per voxel.
    path = tmp_path / "labelsTr" / "case_001.nii.gz"
    label = nib.load(path)
    label.set_sform(None, code=0)
    label.set_qform(AFFINE, code=1)
    nib.save(label, path)
    assert not np.array_equal(nib.load(path).affine, AFFINE)
    assert len(datasets.load(str(tmp_path), (32, 32)).images) == 24


def test_nan_and_inf_are_counted_apart():
    values = np.array([np.nan, np.inf, -np.inf, 1.0, np.nan], np.float32)
    with pytest.raises(
        imagefiles.DataError, match=r"^x\.tif contains non-finite values: 2 NaN and 2 inf of 5$"
    ):
        imagefiles.check_finite(values, "x.tif")


def test_a_training_set_without_foreground_is_refused_whatever_the_source():
    masks = np.zeros((5, 8, 8, 1), np.float32)
    splits = {"train": (masks, masks), "val": (masks[:1], masks[:1] + 1)}
    with pytest.raises(
        ValueError, match="no foreground in the 5 training examples of synthetic-2d"
    ):
        data.require_foreground(splits, "synthetic-2d")
    masks[3, 4, 4] = 1  # one foreground pixel is enough to learn from (the loss sees it)
    data.require_foreground(splits, "synthetic-2d")


def test_imagefiles_describes_the_good_files_and_exits_2_for_the_others(
    tmp_path, capsys, monkeypatch
):
    Image.fromarray(np.zeros((16, 24), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    files = [str(tmp_path / name) for name in ("good.png", "broken.png")]
    monkeypatch.setattr("sys.argv", ["imagefiles.py", *files])
    assert imagefiles.main() == 2
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{files[0]}: image 16x24x1, values 0 to 0"]
    assert len(err.splitlines()) == 1 and err.startswith(
        f"imagefiles.py: error: cannot read {files[1]}"
    )


def _square_mask():
    mask = np.zeros((16, 16), np.uint8)
    mask[4:10, 5:12] = 255
    return mask


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_a_mask_drawn_in_the_alpha_channel_is_read_from_it(mode, tmp_path):
    """One colour everywhere (black), the shape in the transparency: the grey levels are empty."""
    shape = _square_mask()
    black = np.zeros((16, 16, 3 if mode == "RGBA" else 1), np.uint8)
    Image.fromarray(np.dstack([black, shape]).squeeze(), mode).save(tmp_path / "m.png")
    assert np.asarray(Image.open(tmp_path / "m.png").convert("L")).max() == 0  # the old reading
    labels = imagefiles.read_mask(str(tmp_path / "m.png"))
    np.testing.assert_array_equal(labels, shape)
    np.testing.assert_array_equal(imagefiles.label_map(labels, "m.png"), shape > 0)


def test_a_mask_in_colour_with_an_alpha_channel_is_read_from_its_colour(tmp_path):
    shape, alpha = _square_mask(), np.full((16, 16), 255, np.uint8)
    alpha[0, :] = 0  # a varying alpha too: the colour decides
    Image.fromarray(np.dstack([shape, shape, shape, alpha]), "RGBA").save(tmp_path / "m.png")
    np.testing.assert_array_equal(imagefiles.read_mask(str(tmp_path / "m.png")), shape)
