"""Real data: the two folder layouts on files written here, the checks, the group split."""

import nibabel as nib
import numpy as np
import pytest
from helpers import (
    AFFINE,
    TINY_REAL,
    ras,
    refused_in_one_line,
    write_msd_folder,
    write_png_folder,
    write_volume,
)
from PIL import Image

import conv3d
import data
import train
from tp4.images import datasets
from tp4.images.examples import Examples

# ------------------------------------------------------------------------------------------------
# The two layouts, round trip.


def test_png_folder_gives_the_values_written_normalized_and_binary_masks(tmp_path):
    written = write_png_folder(tmp_path)
    examples = datasets.load(str(tmp_path), (32, 32))
    assert examples.layout == "images+masks" and examples.images.shape == examples.masks.shape == (
        4,
        32,
        32,
        1,
    )
    assert set(np.unique(examples.masks)) == {0.0, 1.0}
    for i, (image, mask) in enumerate(written.values()):  # sorted by name, like the loader
        np.testing.assert_allclose(
            examples.images[i, ..., 0], data.normalize_intensity(image.astype(np.float32))
        )
        np.testing.assert_array_equal(examples.masks[i, ..., 0], mask > 0)
    assert examples.groups.tolist() == [0, 1, 2, 3]  # one file, one group


def test_jpeg_and_16_bit_tiff_images_pair_with_png_masks_by_stem(tmp_path):
    write_png_folder(tmp_path, shapes=((32, 32),) * 3)
    rng = np.random.default_rng(1)
    Image.open(tmp_path / "images" / "case0.png").convert("RGB").save(
        tmp_path / "images" / "case0.jpg"
    )
    (tmp_path / "images" / "case0.png").unlink()
    deep = (rng.random((32, 32)) * 60000).astype(
        np.uint16
    )  # beyond 8 bits: must not be clipped to 255
    (tmp_path / "images" / "case1.png").unlink()
    Image.fromarray(deep).save(tmp_path / "images" / "case1.tif")
    examples = datasets.load(str(tmp_path), (32, 32))
    assert len(examples.images) == 3 and examples.images.dtype == np.float32
    np.testing.assert_allclose(
        examples.images[1, ..., 0], data.normalize_intensity(deep.astype(np.float32))
    )


def test_images_of_other_sizes_are_fitted_and_their_masks_stay_binary(tmp_path):
    written = write_png_folder(tmp_path, shapes=((20, 48), (12, 20), (40, 40)))
    examples = datasets.load(str(tmp_path), (32, 32))
    assert examples.images.shape == (3, 32, 32, 1)
    assert set(np.unique(examples.masks)) <= {0.0, 1.0}
    # 12x20 fits in 32x32: only padded (10 rows above, 6 columns left), values untouched.
    image, mask = written["case1"]
    np.testing.assert_allclose(
        examples.images[1, 10:22, 6:26, 0], data.normalize_intensity(image.astype(np.float32))
    )
    np.testing.assert_array_equal(examples.masks[1, 10:22, 6:26, 0], mask > 0)
    assert examples.masks[1].sum() == (mask > 0).sum()
    description = datasets.describe(examples)
    assert description["data_original_shapes"] == "12x20, 20x48, 40x40"


def test_msd_volumes_give_slices_along_the_last_axis_one_group_per_case(tmp_path):
    written = write_msd_folder(tmp_path)
    examples = datasets.load(str(tmp_path), (32, 32))
    assert examples.layout == "msd" and examples.images.shape == (24, 32, 32, 1)
    assert examples.groups.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    for case, (image, label) in enumerate(written.values()):
        # Once per volume, before slicing; stored ALS (AFFINE), sliced in RAS.
        normalized, label = ras(data.normalize_intensity(image)), ras(label)
        for z in range(8):
            np.testing.assert_allclose(examples.images[case * 8 + z, ..., 0], normalized[..., z])
            np.testing.assert_array_equal(examples.masks[case * 8 + z, ..., 0], label[..., z])
    assert examples.group_names == ["case_000", "case_001", "case_002"]


def test_msd_volumes_give_3d_patches_with_depth_along_the_last_axis(tmp_path):
    written = write_msd_folder(tmp_path, shape=(32, 24, 8))
    examples = datasets.load(str(tmp_path), (8, 16, 16))
    # (X, Y, Z) = (32, 24, 8) stored ALS, (24, 32, 8) in RAS -> (D, H, W) = (8, 24, 32), padded
    # to (8, 32, 32): 2 x 2 patches per case.
    assert (
        examples.images.shape == (12, 8, 16, 16, 1)
        and examples.groups.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    )
    image, label = written["case_001"]
    volume = np.moveaxis(ras(data.normalize_intensity(image)), -1, 0)
    np.testing.assert_allclose(
        examples.images[6, :, :8, :, 0], volume[:, 16:24, 0:16]
    )  # 3rd patch of case 1
    np.testing.assert_array_equal(
        examples.masks[4, ..., 0], np.moveaxis(ras(label), -1, 0)[:, 0:16, 0:16]
    )
    assert (examples.images[6, :, 8:] == 0).all()  # H 24 padded to 32 with zeros


@pytest.mark.parametrize(
    "suffixes", [("", ".nrrd"), (".nrrd", ".nrrd"), (".mha", ".mha"), (".mhd", ".nii.gz")]
)
def test_dicom_nrrd_and_mha_give_the_examples_of_the_same_nifti(tmp_path, suffixes):
    write_msd_folder(tmp_path / "nifti", suffixes=(".nii.gz", ".nii.gz"))
    write_msd_folder(tmp_path / "other", suffixes=suffixes)  # same seed: same data
    if suffixes[0] == "":
        assert (tmp_path / "other" / "imagesTr" / "case_000_0000").is_dir()  # a DICOM series
    reference, examples = (
        datasets.load(str(tmp_path / d), (8, 16, 16)) for d in ("nifti", "other")
    )
    np.testing.assert_array_equal(examples.images, reference.images)
    np.testing.assert_array_equal(examples.masks, reference.masks)
    np.testing.assert_allclose(examples.spacing, reference.spacing, rtol=1e-6)
    assert examples.case_ids == reference.case_ids and examples.orientations == ["ALS"] * 3


def test_a_label_stored_in_another_orientation_on_the_same_grid_is_taken(tmp_path):
    written = write_msd_folder(tmp_path, suffixes=("", ".nrrd"))
    image, label = written["case_001"]
    # The same voxels stored RAS: the array reordered, the affine with it (nibabel's canonical).
    canonical = nib.as_closest_canonical(nib.Nifti1Image(label, AFFINE))
    (tmp_path / "labelsTr" / "case_001.nrrd").unlink()
    write_volume(tmp_path / "labelsTr" / "case_001.nrrd", canonical.get_fdata(), canonical.affine)
    examples = datasets.load(str(tmp_path), (32, 32))
    np.testing.assert_array_equal(examples.masks[8:16, ..., 0], np.moveaxis(ras(label), -1, 0))


def test_the_split_never_separates_a_group():
    groups = np.repeat(np.arange(10), 5)
    images = groups.astype(np.float32).reshape(-1, 1, 1, 1)
    examples = Examples(
        images, images, groups, [str(g) for g in range(10)], "test", "msd", [(1, 1)] * 10
    )
    splits, assignment = datasets.split(examples, seed=3)
    seen = [set(splits[name][0].ravel().astype(int)) for name in ("train", "val", "test")]
    assert set.union(*seen) == set(range(10)) and sum(map(len, seen)) == 10  # disjoint, complete
    for name, ids in zip(("train", "val", "test"), seen):
        assert len(splits[name][0]) == 5 * len(ids)  # every example of a group comes along
        assert ids == set(assignment[name].tolist())
    with pytest.raises(datasets.DataError, match="too few"):
        datasets.split(Examples(images[:10], images[:10], groups[:10], ["0", "1"], "t", "msd", []))


def test_description_says_where_the_data_came_from(tmp_path):
    write_msd_folder(tmp_path, n=4)
    splits, description, cases = datasets.load_split(str(tmp_path), (32, 32), seed=0)
    examples = datasets.load(str(tmp_path), (32, 32))
    assert description["data_source"] == str(tmp_path) and description["data_layout"] == "msd"
    assert description["data_files"] == 4 and description["data_count"] == 32
    assert (
        description["data_original_shapes"] == "32x32x8" and description["data_shape"] == "32x32x1"
    )
    assert description["data_split"] == "16/8/8" and description["data_split_unit"] == "cases"
    assert description["data_hash"] == data.content_hash(examples.images, examples.masks)
    assert description["data_foreground_fraction"] == round(float(examples.masks.mean()), 4)
    assert description["data_test_groups"].startswith("case_00")
    # The voxel size from the header (the affine's column norms) in RAS order, in-plane for slices.
    assert description["data_spacing"] == "0.8x0.9 mm"
    assert description["data_orientation"] == "RAS (closest canonical), stored 4 ALS"
    test_case = description["data_test_groups"].split("; ")[0]
    assert cases.ids[:2] == [f"{test_case} slice 0", f"{test_case} slice 1"]
    np.testing.assert_allclose(cases.spacing, np.tile([0.8, 0.9], (8, 1)))


def test_shrunk_images_have_larger_pixels_and_patches_keep_the_voxel_size(tmp_path):
    write_png_folder(tmp_path / "png", shapes=((64, 64), (20, 48), (32, 32)))
    examples = datasets.load(str(tmp_path / "png"), (32, 32))
    # 64x64 -> 32x32: pixels of 2; 20x48 -> 13x32 (scale 2/3, rounded): 20/13 by 48/32.
    np.testing.assert_allclose(examples.spacing, [[2, 2], [20 / 13, 1.5], [1, 1]])
    assert examples.case_ids == ["case0", "case1", "case2"]
    assert datasets.describe(examples)["data_spacing"] == "1x1, 1.54x1.5, 2x2 px"
    write_msd_folder(tmp_path / "msd", shape=(32, 24, 8))
    patches = datasets.load(str(tmp_path / "msd"), (8, 16, 16))
    # (D, H, W) = (S, R, A): 2.5, 0.8, 0.9 mm; no resize for patches.
    np.testing.assert_allclose(patches.spacing, np.tile([2.5, 0.8, 0.9], (12, 1)))
    assert patches.case_ids[:2] == ["case_000 patch 0,0,0", "case_000 patch 0,0,16"]


def test_label_maps_of_several_classes(tmp_path):
    write_msd_folder(tmp_path)
    _bad_label(tmp_path)  # case_001 holds 0, 1 and 2
    examples = datasets.load(str(tmp_path), (32, 32), num_classes=3)
    assert set(np.unique(examples.masks)) == {0.0, 1.0, 2.0}
    assert examples.masks[examples.groups == 1].max() == 2  # labels kept, not binarized
    label = np.zeros((32, 32, 8), np.uint8)
    label[:2, :2], label[4:6, 4:6], label[8:9, 8:9] = 1, 2, 3
    nib.save(nib.Nifti1Image(label, AFFINE), tmp_path / "labelsTr" / "case_002.nii")
    with pytest.raises(datasets.DataError) as error:
        datasets.load(str(tmp_path), (32, 32), num_classes=3)
    assert str(error.value).endswith(
        "case_002.nii has 4 distinct values (0, 1, 2, 3): at most 3 with --num-classes 3"
    )
    label[8:9, 8:9] = 0
    label[4:6, 4:6] = 7
    nib.save(nib.Nifti1Image(label, AFFINE), tmp_path / "labelsTr" / "case_002.nii")
    with pytest.raises(datasets.DataError, match=r"values 0, 1, 7: labels of 3 classes are 0..2"):
        datasets.load(str(tmp_path), (32, 32), num_classes=3)
    with pytest.raises(datasets.DataError, match="mni-wm has two classes"):
        datasets.load("mni-wm", (32, 32), num_classes=3)


# ------------------------------------------------------------------------------------------------
# Bad data: one DataError naming the file, before anything starts.


def _corrupt(path):
    path.write_bytes(path.read_bytes()[:40])


def _bad_label(root):
    label = np.zeros((32, 32, 8), np.uint8)
    label[2:5, 2:5] = 1
    label[10:12, 10:12] = 2
    nib.save(nib.Nifti1Image(label, AFFINE), root / "labelsTr" / "case_001.nii.gz")


def _mask_without_background(root):
    mask = np.full((32, 32), 1, np.uint8)
    mask[4:9, 4:9] = 255
    Image.fromarray(mask).save(root / "masks" / "case2.png")


def _nan_image(root):
    image = np.ones((32, 32, 8), np.float32)
    image[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(image, AFFINE), root / "imagesTr" / "case_000_0000.nii.gz")


def _nan_tiff(root):
    image = np.ones((32, 32), np.float32)
    image[0, 0] = np.nan
    Image.fromarray(image).save(root / "images" / "case2.tif")
    (root / "images" / "case2.png").unlink()


def _shape_mismatch_png(root):
    Image.fromarray(np.zeros((30, 32), np.uint8)).save(root / "masks" / "case1.png")


def _shape_mismatch_nifti(root):
    nib.save(
        nib.Nifti1Image(np.zeros((32, 32, 7), np.uint8), AFFINE), root / "labelsTr" / "case_002.nii"
    )


def _label_moved(name, axis_flipped=False):
    def spoil(root):
        path = next((root / "labelsTr").glob("case_001.*"))
        path.unlink()
        affine = AFFINE.copy()
        affine[:3, 3] += (0, 0, 5)
        if axis_flipped:  # the first axis reversed about the same origin: voxels elsewhere
            affine = AFFINE @ np.diag([-1.0, 1.0, 1.0, 1.0])
        write_volume(root / "labelsTr" / name, np.zeros((32, 32, 8), np.uint8), affine)

    return spoil


def _foreign_file_in_a_series(root):
    (root / "imagesTr" / "case_002_0000" / "Thumbs.db").write_bytes(b"\0" * 64)


def _second_channel(root):
    first = root / "imagesTr" / "case_000_0000.nii.gz"
    first.with_name("case_000_0001.nii.gz").write_bytes(first.read_bytes())


def _colour_image(root):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        root / "images" / "case3.png"
    )


BAD = {
    "missing folder": ("png", lambda root: None, "no such folder", "nowhere"),
    "no layout": (
        "png",
        lambda root: (root / "images").rename(root / "pictures"),
        "holds neither",
        None,
    ),
    "empty images": (
        "png",
        lambda root: [p.unlink() for p in (root / "images").iterdir()],
        "holds no image",
        None,
    ),
    "image without mask": (
        "png",
        lambda root: (root / "masks" / "case2.png").unlink(),
        "1 image has no mask in",
        "case2.png",
    ),
    "mask without image": (
        "msd",
        lambda root: (root / "imagesTr" / "case_001_0000.nii.gz").unlink(),
        "1 mask has no image in",
        "case_001.nii.gz",
    ),
    "corrupt png": (
        "png",
        lambda root: _corrupt(root / "images" / "case1.png"),
        "cannot read",
        "case1.png",
    ),
    "corrupt nifti": (
        "msd",
        lambda root: _corrupt(root / "labelsTr" / "case_000.nii.gz"),
        "cannot read",
        "case_000.nii.gz",
    ),
    "png shape mismatch": (
        "png",
        _shape_mismatch_png,
        "is 32x32 but its mask case1.png is 30x32",
        "case1.png",
    ),
    "nifti shape mismatch": (
        "msd",
        _shape_mismatch_nifti,
        "is 32x32x8 but its mask case_002.nii is 32x32x7",
        "case_002_0000.nii",
    ),
    "three label values": ("msd", _bad_label, r"3 distinct values \(0, 1, 2\)", "case_001.nii.gz"),
    "binary mask without 0": (
        "png",
        _mask_without_background,
        r"has the values 1, 255: a binary mask has 0 and one label",
        "case2.png",
    ),
    "nan in a volume": ("msd", _nan_image, "NaN", "case_000_0000.nii.gz"),
    "nan in a float tiff": ("png", _nan_tiff, "NaN", "case2.tif"),
    "colour image": ("png", _colour_image, "3 colour channels", "case3.png"),
    "label moved": (
        "msd",
        _label_moved("case_001.nii.gz"),
        "case_001_0000.nii.gz and its label case_001.nii.gz are not on the same grid",
        "up to 5 mm",
    ),
    "label of a series flipped": (
        "dicom",
        _label_moved("case_001.nrrd", axis_flipped=True),
        "image case_001_0000 and its label case_001.nrrd are not on the same grid",
        "case_001.nrrd",
    ),
    "a file in a series that is not a slice": (
        "dicom",
        _foreign_file_in_a_series,
        "is not a slice of the DICOM series",
        "case_002_0000/Thumbs.db",
    ),
    "two channels of one case": (
        "msd",
        lambda root: _second_channel(root),
        "single-channel",
        "case_000_0001.nii.gz",
    ),
}


def make_bad(tmp_path, case):
    layout, spoil, _, _ = BAD[case]
    root = tmp_path / "data"
    if layout == "dicom":
        write_msd_folder(root, suffixes=("", ".nrrd"))
    else:
        (write_png_folder if layout == "png" else write_msd_folder)(root)
    spoil(root)
    return tmp_path / "nowhere" if case == "missing folder" else root


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_is_one_data_error_that_names_the_file(tmp_path, case):
    folder = make_bad(tmp_path, case)
    with pytest.raises(datasets.DataError, match=BAD[case][2]) as error:
        datasets.load(str(folder), (32, 32))
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, ValueError)
    assert BAD[case][3] is None or BAD[case][3] in message


@pytest.mark.parametrize(
    "case", ["image without mask", "corrupt png", "three label values", "missing folder"]
)
def test_train_refuses_bad_data_in_one_line_exit_2_and_no_run(tmp_path, store, capsys, case):
    assert BAD[case][3] in refused_in_one_line(
        TINY_REAL + ["--data-dir", str(make_bad(tmp_path, case))], capsys
    )
    assert store.get_experiment_by_name("tiny") is None
    assert store.search_runs([e.experiment_id for e in store.search_experiments()]) == []


def test_conv3d_refuses_2d_images_before_the_tables(tmp_path, capsys):
    write_png_folder(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        conv3d.main(["--data-dir", str(tmp_path), "--shape", "8", "16", "16", "--no-peak-memory"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.strip().endswith("3D training needs volumes (imagesTr/ + labelsTr/)")
    assert captured.out == ""  # refused before the model summary and the memory tables


def test_data_dir_and_dataset_are_alternatives(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--data-dir", "x", "--dataset", "mni-wm"])
    assert "not allowed with argument" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# End to end: a real-data run is tracked like a synthetic one.


@pytest.mark.slow
def test_train_on_an_msd_folder_logs_the_data_description(tmp_path, store):
    write_msd_folder(tmp_path / "msd", n=4)
    results = train.train(train.parse_args(TINY_REAL + ["--data-dir", str(tmp_path / "msd")]))
    run = store.search_runs([store.get_experiment_by_name("tiny").experiment_id])[0]
    assert run.info.status == "FINISHED" and 0 <= results["test_dice"] <= 1
    params = run.data.params
    assert (params["data_layout"], params["data_source"], params["data_split"]) == (
        "msd",
        str(tmp_path / "msd"),
        "16/8/8",
    )
    assert params["data_split_unit"] == "cases" and "data_contrast" not in params
