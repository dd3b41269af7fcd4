"""Volumes as scanners and research tools write them: NIfTI, NRRD, MetaImage and DICOM series.

What this module teaches:
- a volume is an array *and* a geometry: voxel spacing, origin and direction (the axes of the voxel
  grid in the patient). NIfTI is read with nibabel; NRRD (`.nrrd`, `.nhdr`), MetaImage (`.mha`,
  `.mhd`) and DICOM series (a folder of slices: one case = one folder) with SimpleITK, the readers
  nnU-Net uses. SimpleITK orders the slices of a series by their position along the slice normal and
  applies each slice's rescale slope and intercept: a CT comes out in Hounsfield units;
- every format is brought to one orientation, the closest canonical **RAS** (array axes towards
  the patient's Right, Anterior, Superior: nibabel's `as_closest_canonical`), by transposing and
  flipping axes, never by interpolating. The same scan stored LPS (DICOM, ITK), LAS or ALS gives
  the same array, so a model is trained on one orientation, and 2D slices are axial.
  `Volume.stored` undoes it: a mask is written back over the input's own grid (same shape,
  spacing, origin, direction);
- ITK's world coordinates are LPS (x towards the patient's Left, y Posterior), NIfTI's RAS: one
  sign flip of x and y (`LPS_TO_RAS`) turns a SimpleITK image's geometry into a NIfTI-style affine;
- what the readers accept silently is refused here, in one line naming the file: two series in one
  folder, a file that is not a slice of the series, a gap or uneven steps between slice positions,
  an oblique volume (axes more than OBLIQUE_DEGREES off the patient's axes: no axis order makes it
  RAS without resampling; resample it first), an unreadable header.

datasets.py (training) and tp4/inference (predict.py) read and write volumes through this module.

    python -m tp4.images.volumes PATH...  # the geometry of each volume or DICOM series folder
"""

import contextlib
import os
import sys
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from nibabel import orientations

from tp4 import cli
from tp4.images import imagefiles
from tp4.images.imagefiles import DataError

ITK_SUFFIXES = imagefiles.ITK_SUFFIXES
VOLUME_SUFFIXES = imagefiles.NIFTI_SUFFIXES + ITK_SUFFIXES
# Masks are written whole under a temporary name, then renamed: a detached header (.nhdr, .mhd)
# would name a data file that no longer exists. The same format in one file instead; a DICOM
# series gets an NRRD, whose text header keeps the geometry in doubles (NIfTI stores float32).
MASK_SUFFIX = {".nhdr": ".nrrd", ".mhd": ".mha"}
SERIES_MASK_SUFFIX = ".nrrd"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
RAS = orientations.axcodes2ornt("RAS")
# Axes further than this from the patient's axes are oblique. Scanners write the cosines of an
# axial series to ~1e-6; an angulated MR (often 5-20 degrees) needs resampling onto the axes.
OBLIQUE_DEGREES = 1.0
# Slice steps of a series may differ by this fraction of the median step (rounding in the
# headers); a missing slice doubles one step.
STEP_TOLERANCE = 0.01
# The geometry of a SimpleITK image as stored (ITK's LPS), to write a mask over it.
Grid = namedtuple("Grid", "size spacing origin direction")


@dataclass(frozen=True)
class Volume:
    """A volume in RAS order, and what puts a mask back over its file."""

    array: np.ndarray  # (X, Y, Z) intensities, RAS order
    affine: np.ndarray  # 4x4: voxel index of `array` -> RAS millimetres
    spacing: tuple  # voxel size along each axis of `array`, mm
    path: str
    ornt: np.ndarray  # nibabel orientation of the stored array, undone by `stored`
    header: object  # the nibabel image (NIfTI) or the Grid (SimpleITK) of the file

    @property
    def stored_axes(self) -> str:
        """Axis codes of the file's array, e.g. "LPS" for a DICOM series read by ITK."""
        return "".join(orientations.ornt2axcodes(self.ornt))

    def stored(self, array: np.ndarray) -> np.ndarray:
        """`array` (X, Y, Z[, ...]) of this volume's RAS order back in the file's order."""
        return orientations.apply_orientation(array, orientations.ornt_transform(RAS, self.ornt))


def is_volume(path) -> bool:
    """True for a file of a volume format or a folder (a DICOM series)."""
    return imagefiles.suffix(path) in VOLUME_SUFFIXES or os.path.isdir(path)


@contextlib.contextmanager
def _itk_quiet():
    """ITK's warnings off (multi-line, on stderr: "No Series were found", uneven steps): what
    matters is said here, in one line."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def is_series(folder) -> bool:
    """True if `folder` holds DICOM slices (GDCM finds a series UID in it)."""
    if not os.path.isdir(folder):
        return False
    with _itk_quiet():
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def list_volumes(folder):
    """Sorted volume files and sub-folders (DICOM series) of `folder`, hidden ones skipped."""
    files = imagefiles.list_files(folder, VOLUME_SUFFIXES)
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    series = [os.path.join(folder, n) for n in names if os.path.isdir(os.path.join(folder, n))]
    return sorted(files + series)


def mask_suffix(path) -> str:
    """The suffix of a mask written over `path`: its own format, in one file."""
    if os.path.isdir(path):
        return SERIES_MASK_SUFFIX
    ext = imagefiles.suffix(path)
    return MASK_SUFFIX.get(ext, ext)


def read(path) -> Volume:
    """The volume of a NIfTI, NRRD or MetaImage file or a DICOM series folder, in RAS order.

    Args:
        path: the file, or the folder of one DICOM series.

    Returns:
        A Volume; DataError (one line naming the file) for anything unreadable or refused.
    """
    if imagefiles.is_nifti(path):
        array, image = imagefiles.read_volume(path)
        return _canonical(array, image.affine, imagefiles.voxel_size_mm(image), path, image)
    if os.path.isdir(path):
        image = _read_series(path)
    else:
        imagefiles.require_file(path)
        image = _sitk_call(sitk.ReadImage, path, str(path))
    return _from_sitk(image, path)


def _reason(error):
    """The line of an ITK exception that says what went wrong (its first line is a source file)."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    if not lines:
        return cli.first_line(error)
    reason = lines[-1].removeprefix("[nrrd] ").removeprefix("sitk::ERROR: ")
    return reason.split("): ", 1)[-1] if reason.startswith("itk::ERROR") else reason


def _sitk_call(function, path, *args):
    try:
        return function(*args)
    except RuntimeError as error:
        raise DataError(f"cannot read {path}: {_reason(error)}") from None


def series_files(folder):
    """The slices of the one DICOM series in `folder`, ordered along the slice normal (GDCM)."""
    folder = str(folder)
    with _itk_quiet():
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not uids:
        raise DataError(f"{folder} holds no DICOM series (no DICOM file with a series UID)")
    if len(uids) > 1:
        raise DataError(
            f"{folder} holds {len(uids)} DICOM series ({', '.join(uids)}): one series per folder, "
            "move each into its own"
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uids[0])
    slices = {os.path.normpath(f) for f in files}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.startswith(".") and os.path.normpath(path) not in slices:
            raise DataError(
                f"{path} is not a slice of the DICOM series {uids[0]} in {folder}: "
                "a series folder holds its slices only"
            )
    return files


def _read_series(folder):
    files = series_files(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's header: its position
    with _itk_quiet():
        image = _sitk_call(reader.Execute, folder)
    if len(files) > 1:
        _check_steps(reader, files, np.reshape(image.GetDirection(), (3, 3))[:, 2], folder)
    return image


def _check_steps(reader, files, normal, folder):
    """DataError unless the slices' positions (0020,0032) along `normal` step evenly."""
    positions = []
    for i, path in enumerate(files):
        if not reader.HasMetaDataKey(i, "0020|0032"):
            raise DataError(f"{path} has no Image Position (0020,0032): its place is unknown")
        positions.append([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")])
    steps = np.diff(np.asarray(positions) @ normal)
    step = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - step)))
    if steps.min() <= 0 or abs(steps[worst] - step) > STEP_TOLERANCE * step:
        a, b = (os.path.basename(files[i]) for i in (worst, worst + 1))
        raise DataError(
            f"{folder}: uneven slice positions, {steps[worst]:.4g} mm between {a} and {b} where "
            f"the other steps are {step:.4g} mm (a missing or repeated slice?)"
        )


def _from_sitk(image, path):
    """A Volume from a SimpleITK image: its (z, y, x) array transposed to (x, y, z), and its LPS
    geometry as a RAS affine."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(
            f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel: one "
            "single-channel volume is expected"
        )
    grid = Grid(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)  # (X, Y) -> (X, Y, 1), as a 2D NIfTI
    if image.GetDimension() != 3:
        raise DataError(
            f"{path} has {image.GetDimension()} dimensions ({imagefiles.shape_text(grid.size)}): "
            "one volume (X, Y, Z) is expected"
        )
    array = sitk.GetArrayFromImage(image).transpose()
    axes = np.reshape(image.GetDirection(), (3, 3)) * image.GetSpacing()
    affine = LPS_TO_RAS @ np.vstack([np.column_stack([axes, image.GetOrigin()]), [0, 0, 0, 1]])
    imagefiles.check_size(array.shape[:2], path, "voxels in-plane")
    return _canonical(imagefiles.check_finite(array, path), affine, image.GetSpacing(), path, grid)


def _canonical(array, affine, spacing, path, header):
    """The Volume of a stored array and its affine, its axes transposed and flipped to RAS."""
    cosines = np.abs(affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0))
    degrees = float(np.degrees(np.arccos(np.clip(cosines.max(axis=0), 0, 1))).max())
    if degrees > OBLIQUE_DEGREES:
        raise DataError(
            f"{path} is oblique: its voxel axes lie up to {degrees:.1f} degrees off the patient's "
            f"axes (more than the {OBLIQUE_DEGREES:g} accepted); resample it onto them first "
            "(sitk.Resample, 3D Slicer's Resample Scalar Volume)"
        )
    ornt = orientations.io_orientation(affine)
    canonical = affine @ orientations.inv_ornt_aff(ornt, array.shape)
    ras_spacing = [0.0] * 3
    for axis, (target, _) in enumerate(ornt):
        ras_spacing[int(target)] = float(spacing[axis])
    array = orientations.apply_orientation(array, ornt)
    return Volume(array, canonical, tuple(ras_spacing), str(path), ornt, header)


def write_mask(path, labels, volume: Volume):
    """Write uint8 `labels` (the file's own order: `volume.stored`) over the voxels of `volume`'s
    file: a NIfTI with its affine and header, another format with its spacing, origin, direction."""
    labels = np.asarray(labels).astype(np.uint8)
    if isinstance(volume.header, Grid):
        grid = volume.header
        image = sitk.GetImageFromArray(labels.reshape(grid.size).transpose())
        image.SetSpacing(grid.spacing)
        image.SetOrigin(grid.origin)
        image.SetDirection(grid.direction)
        sitk.WriteImage(image, str(path), useCompression=True)
        return
    # The input's class (NIfTI-1 or -2), affine and header: the mask lands on the same voxels in
    # millimetres. A new data array resets the header's intensity scaling, and uint8 keeps the
    # labels exact.
    nifti = volume.header
    out = type(nifti)(labels.reshape(nifti.shape), nifti.affine, nifti.header)
    out.set_data_dtype(np.uint8)
    out.header["cal_min"], out.header["cal_max"] = 0, max(1, int(labels.max()))
    out.to_filename(path)


def describe(volume: Volume) -> str:
    """One line: shape, orientation, spacing, origin (RAS mm of the first voxel), values."""
    origin = ", ".join(f"{v:.4g}" for v in volume.affine[:3, 3])
    return (
        f"{imagefiles.shape_text(volume.array.shape)} {volume.array.dtype}, stored "
        f"{volume.stored_axes} -> RAS, voxels {'x'.join(f'{s:.4g}' for s in volume.spacing)} mm, "
        f"origin ({origin}) mm RAS, values {volume.array.min():g} to {volume.array.max():g}"
    )


def main():
    parser = cli.argument_parser("volumes.py", __doc__)
    parser.add_argument("paths", nargs="+", help="NIfTI, NRRD, MHA/MHD files, DICOM series folders")
    return imagefiles.describe_each(
        parser.prog, parser.parse_args().paths, lambda p: describe(read(p))
    )


if __name__ == "__main__":
    sys.exit(main())
