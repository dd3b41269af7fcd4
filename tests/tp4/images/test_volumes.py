"""volumes.py: every format read to the same RAS volume as NIfTI, masks written back on the input's
grid to 1e-6, Hounsfield units from DICOM, and each bad input one line naming the file."""

import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers import AFFINE, REPO, itk_geometry, write_volume
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_rescale

from tp4.images import volumes
from tp4.images.imagefiles import DataError

FORMATS = ["scan.nii.gz", "scan.nrrd", "scan.nhdr", "scan.mha", "scan.mhd", "series"]


def _intensities(shape=(16, 12, 8), seed=0):
    return np.random.default_rng(seed).integers(-1000, 1000, shape).astype(np.int16)


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_gives_nibabels_canonical_ras_volume(tmp_path, name):
    stored = _intensities()
    volume = volumes.read(str(write_volume(tmp_path / name, stored)))
    # The reference: nibabel's own closest canonical orientation of the NIfTI of the same data.
    canonical = nib.as_closest_canonical(nib.Nifti1Image(stored, AFFINE))
    np.testing.assert_array_equal(volume.array, canonical.get_fdata())
    np.testing.assert_allclose(volume.affine, canonical.affine, atol=1e-6)
    assert volume.stored_axes == "ALS" and volume.spacing == pytest.approx((0.8, 0.9, 2.5))
    np.testing.assert_array_equal(volume.stored(volume.array), stored)


def _grid(path):
    if path.endswith((".nii", ".nii.gz")):
        image = nib.load(path)
        return image.shape, image.affine
    if os.path.isdir(path):  # a DICOM series
        image = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(path))
    else:
        image = sitk.ReadImage(path)
    return image.GetSize(), np.hstack([image.GetSpacing(), image.GetOrigin(), image.GetDirection()])


@pytest.mark.parametrize("name", FORMATS)
def test_a_mask_is_written_back_on_the_inputs_grid(tmp_path, name):
    path = str(write_volume(tmp_path / name, _intensities()))
    volume = volumes.read(path)
    labels = (volume.array > 0).astype(np.uint8)  # "predicted" in RAS order
    mask_path = str(tmp_path / f"mask{volumes.mask_suffix(path)}")
    volumes.write_mask(mask_path, volume.stored(labels), volume)
    assert mask_path.endswith(
        {"scan.nhdr": ".nrrd", "scan.mhd": ".mha", "series": ".nrrd"}.get(name, name[4:])
    )
    image_shape, image_geometry = _grid(path)
    mask_shape, mask_geometry = _grid(mask_path)
    assert tuple(mask_shape) == tuple(image_shape)
    np.testing.assert_allclose(mask_geometry, image_geometry, atol=1e-6)
    mask = volumes.read(mask_path)
    assert mask.array.dtype == np.uint8
    np.testing.assert_array_equal(mask.array, labels)  # on the same voxels: same anatomy
    np.testing.assert_allclose(mask.affine, volume.affine, atol=1e-6)


def test_a_dicom_series_is_ordered_along_the_normal_in_lps(tmp_path):
    # An axial series as scanners write it (LPS), slices named in the reverse of their order.
    affine = np.diag([-0.7, -0.7, 3.0, 1.0])
    affine[:3, 3] = (90.0, 120.0, -40.0)
    stored = _intensities((16, 16, 8))
    volume = volumes.read(str(write_volume(tmp_path / "series", stored, affine)))
    assert volume.stored_axes == "LPS"
    np.testing.assert_array_equal(volume.array, stored[::-1, ::-1, :])
    spacing, origin, direction = itk_geometry(affine)
    assert volume.header.origin == pytest.approx(origin, abs=1e-6)
    assert volume.header.direction == pytest.approx(direction, abs=1e-6)


def test_dicom_rescale_slope_and_intercept_give_hounsfield_units(tmp_path):
    """pydicom's CT_small.dcm (intercept -1024), and a copy stored with slope 2, intercept -1000:
    the values are pydicom's apply_rescale of the stored pixels."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for name, slope, intercept in (("original", None, None), ("rescaled", 2, -1000)):
        (tmp_path / name).mkdir()
        if slope is not None:
            dataset.RescaleSlope, dataset.RescaleIntercept = slope, intercept
        dataset.save_as(tmp_path / name / "CT_small.dcm")
        volume = volumes.read(str(tmp_path / name))
        hounsfield = apply_rescale(dataset.pixel_array, dataset).astype(np.float64)
        assert hounsfield.min() < dataset.pixel_array.min()  # the rescale moved the values
        # pixel_array is (rows, columns) = (y, x)
        np.testing.assert_array_equal(volume.stored(volume.array)[..., 0], hounsfield.T)


def _two_series(root):
    series = write_volume(root / "series", _intensities())
    other = write_volume(root / "other", _intensities(seed=1))
    shutil.copy(other / "IM0001.dcm", series / "other.dcm")
    return series, series, "holds 2 DICOM series"


def _missing_slice(root):
    series = write_volume(root / "series", _intensities())
    (series / "IM0004.dcm").unlink()
    return series, series, "uneven slice positions, 5 mm between IM0005.dcm and IM0003.dcm"


def _repeated_slice(root):
    series = write_volume(root / "series", _intensities())
    dataset = pydicom.dcmread(series / "IM0004.dcm")
    dataset.SOPInstanceUID = dataset.SOPInstanceUID + ".9"
    dataset.save_as(series / "IM0004b.dcm")
    return series, series, "uneven slice positions, 0 mm between"


def _uneven_steps(root):
    series = write_volume(root / "series", _intensities())
    for path in sorted(series.glob("IM000[1-3].dcm")):  # the last three slices, 0.5 mm further
        dataset = pydicom.dcmread(path)
        dataset.ImagePositionPatient[2] += 0.5
        dataset.save_as(path)
    return series, series, "uneven slice positions, 3 mm between IM0004.dcm and IM0003.dcm"


def _not_dicom(root):
    series = write_volume(root / "series", _intensities())
    (series / "notes.txt").write_text("slice thickness 2.5 mm")
    return series, series / "notes.txt", "is not a slice of the DICOM series"


def _no_dicom(root):
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("nothing")
    return root / "empty", root / "empty", "holds no DICOM series"


def _oblique(name):
    def write(root):
        turn = np.radians(10)
        rotation = np.array(
            [[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]]
        )
        affine = AFFINE.copy()
        affine[:3, :3] = rotation @ AFFINE[:3, :3]
        path = write_volume(root / name, _intensities(), affine)
        return path, path, "is oblique: its voxel axes lie up to 10.0 degrees"

    return write


def _bad_header(name):
    def write(root):
        (root / name).write_text("NRRD0004\ntype: what\n\n")
        return root / name, root / name, "cannot read"

    return write


BAD = {
    "two series in one folder": _two_series,
    "a missing slice": _missing_slice,
    "a repeated slice": _repeated_slice,
    "uneven steps": _uneven_steps,
    "a file that is not a slice": _not_dicom,
    "a folder without DICOM": _no_dicom,
    "an oblique NRRD": _oblique("scan.nrrd"),
    "an oblique NIfTI": _oblique("scan.nii.gz"),
    "an oblique series": _oblique("series"),
    "an unreadable NRRD header": _bad_header("scan.nrrd"),
    "an unreadable MHA header": _bad_header("scan.mha"),
    "a NIfTI that is not one": _bad_header("scan.nii.gz"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_volumes_are_one_line_naming_the_file(tmp_path, case):
    path, named, expected = BAD[case](tmp_path)
    with pytest.raises(DataError) as error:
        volumes.read(str(path))
    message = str(error.value)
    assert "\n" not in message and str(named) in message and expected in message, message


def test_the_command_line_says_each_volumes_geometry_or_its_error(tmp_path):
    good = write_volume(tmp_path / "series", _intensities())
    bad = _bad_header("bad.mha")(tmp_path)[0]
    empty = _no_dicom(tmp_path)[0]  # GDCM's own multi-line warnings stay silent
    result = subprocess.run(
        [sys.executable, "-m", "tp4.images.volumes", str(good), str(bad), str(empty)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        f"{good}: 12x16x8 int32, stored ALS -> RAS, voxels 0.8x0.9x2.5 mm, origin (11.2, -15, 7) "
        "mm RAS, values -1000 to 999"
    ]
    errors = result.stderr.splitlines()
    assert len(errors) == 2 and str(bad) in errors[0] and str(empty) in errors[1], errors


def test_a_2d_mha_is_one_slice_and_its_mask_stays_2d_while_4d_is_refused(tmp_path):
    image = sitk.GetImageFromArray(_intensities((12, 16)).T)
    image.SetSpacing((0.5, 0.6))
    sitk.WriteImage(image, str(tmp_path / "flat.mha"))
    volume = volumes.read(str(tmp_path / "flat.mha"))
    assert volume.array.shape[2] == 1 and volume.stored(volume.array).shape == (12, 16, 1)
    volumes.write_mask(str(tmp_path / "mask.mha"), volume.stored(volume.array > 0), volume)
    mask = sitk.ReadImage(str(tmp_path / "mask.mha"))
    assert mask.GetSize() == (12, 16) and mask.GetSpacing() == pytest.approx((0.5, 0.6))
    sitk.WriteImage(sitk.Image([16, 16, 8, 2], sitk.sitkInt16), str(tmp_path / "time.mha"))
    with pytest.raises(DataError, match=r"time.mha has 4 dimensions \(16x16x8x2\)"):
        volumes.read(str(tmp_path / "time.mha"))
