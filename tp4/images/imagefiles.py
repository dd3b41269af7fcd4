"""Reading PNG, JPEG, TIFF images and NIfTI volumes, with checks that turn bad data into one line.

What this script teaches:
- real files are messier than synthetic arrays: 8- or 16-bit, grey or grey saved as RGB, with an
  alpha channel, palette images, float TIFFs holding NaNs, truncated downloads, macOS `._` files
  inside archives, broken symbolic links, 1x1 icons. Each reader returns plain float32 arrays or
  raises `DataError` naming the file and the problem;
- a NIfTI file is an array *and* a geometry: the affine maps voxel indices to millimetres in the
  scanner. `read_volume` returns both, so that a predicted mask can be written back over the same
  voxels (predict.py), and `check_same_grid` refuses a label whose affine puts it elsewhere than
  its image (an axis flipped or an origin moved by the tool that wrote it);
- masks are checked, not trusted: a binary mask has at most two distinct values (0 and one label),
  binarized as `value > 0`; a mask of C classes holds the labels 0..C-1 themselves (as MSD and
  nnU-Net store them). A JPEG mask fails this check: its compression invents intermediate values;
- a NIfTI header also gives the voxel size (`voxel_size_mm`): surface distances are in millimetres.

datasets.py (training data) and predict.py (new images) read files through this module only.

    python -m tp4.images.imagefiles FILE...     # what each file holds, as the loaders see it
"""

import os
import sys

import nibabel as nib
import numpy as np
from PIL import Image

from tp4 import cli

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")  # NRRD, MetaImage: read by tp4/images/volumes
# Pillow modes converted to RGB(A) before reading: their raw values are not intensities (palette
# indices, CMYK inks...). Grey modes (1, L, I;16, I, F) are read as stored.
_CONVERT_TO_RGBA = ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV")
# Fewer pixels than this on a side (in-plane for a volume): an icon, a thumbnail or a broken export,
# not a scan. The smallest images of a medical benchmark (MedMNIST) are 28x28.
MIN_SIDE = 8
# A label is on its image's grid if no voxel moves by more than this fraction of a voxel between
# the two affines. Headers store them as float32, so the same grid written by two tools differs by
# ~1e-7 of a voxel per voxel index (about 1e-4 mm across 512 voxels); a flipped axis or a shifted
# origin moves voxels by whole millimetres. 1/100 of a voxel is invisible, and 100x above the noise.
GRID_TOLERANCE = 0.01


class DataError(ValueError):
    """Bad input data. The message is one line that names the file and what is wrong with it."""


def suffix(path):
    """The lower-case known suffix of `path` (".nii.gz" counts as one), or "" for any other file."""
    name = os.path.basename(str(path)).lower()
    known = IMAGE_SUFFIXES + NIFTI_SUFFIXES + ITK_SUFFIXES
    return next((s for s in known if name.endswith(s)), "")


def stem(path):
    """File name without its known suffix: "case_001.nii.gz" -> "case_001"; a folder's (a DICOM
    series) whole name."""
    name = os.path.basename(os.path.normpath(str(path)))
    if os.path.isdir(path):
        return name
    return name[: len(name) - len(suffix(path))] if suffix(path) else os.path.splitext(name)[0]


def is_nifti(path):
    return suffix(path) in NIFTI_SUFFIXES


def list_files(folder, suffixes=IMAGE_SUFFIXES + NIFTI_SUFFIXES + ITK_SUFFIXES):
    """Sorted paths of the files in `folder` with one of `suffixes`. Hidden files are skipped: the
    MSD archives, packed on macOS, hold a `._name.nii.gz` resource file next to every volume."""
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and suffix(n) in suffixes)
    paths = [os.path.join(folder, n) for n in names]
    # A broken link is kept, for its reader to name it as such (not as a file that is missing).
    return [p for p in paths if os.path.isfile(p) or (os.path.islink(p) and not os.path.exists(p))]


def check_finite(array, path):
    """Raise DataError if `array` holds NaN or infinite values (float TIFFs and NIfTIs can)."""
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        counts = [(int(np.isnan(array).sum()), "NaN"), (int(np.isinf(array).sum()), "inf")]
        found = " and ".join(f"{n} {what}" for n, what in counts if n)
        raise DataError(f"{path} contains non-finite values: {found} of {array.size}")
    return array


def check_size(shape, path, unit="pixels"):
    """DataError if a side of `shape` (in-plane for a volume) is under MIN_SIDE `unit`."""
    if min(shape) < MIN_SIDE:
        raise DataError(
            f"{path} is {shape_text(shape)}: fewer than {MIN_SIDE} {unit} on a side, too small "
            "to be a scan"
        )


def require_file(path):
    """DataError if `path` is a broken symbolic link or no file."""
    if os.path.islink(path) and not os.path.exists(path):
        raise DataError(
            f"{path} is a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        )
    if not os.path.isfile(path):
        raise DataError(f"no such file: {path}")


def check_same_grid(shape, image_affine, label_affine, image_path, label_path):
    """Raise DataError if an image and its label, of the same (X, Y, Z) `shape`, place their voxels
    at different millimetres: the largest move of a voxel from one affine to the other (at a
    corner of the volume, the map being affine) beyond GRID_TOLERANCE of the smallest voxel."""
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in shape], [1])).reshape(4, -1)
    moves = np.linalg.norm(((image_affine - label_affine) @ corners)[:3], axis=0)
    voxel = float(np.linalg.norm(image_affine[:3, :3], axis=0).min())
    if moves.max() > GRID_TOLERANCE * voxel:
        raise DataError(
            f"image {os.path.basename(image_path)} and its label {os.path.basename(label_path)} "
            f"are not on the same grid: their affines (voxel to mm) move voxels by up to "
            f"{moves.max():.3g} mm ({moves.max() / voxel:.3g} voxels), e.g. an axis flipped or an "
            "origin shifted by the tool that wrote the label"
        )


def _open(path):
    """A fully decoded Pillow image: a truncated file fails here, not later in the middle of
    training."""
    require_file(path)
    try:
        image = Image.open(path)
        if getattr(image, "n_frames", 1) > 1:
            raise DataError(
                f"{path} has {image.n_frames} frames (a multi-page TIFF): "
                "one 2D image per file is read"
            )
        image.load()
        return image
    except DataError:
        raise
    # Pillow raises OSError, ValueError, SyntaxError...: all mean "cannot read"
    except Exception as error:
        raise DataError(f"cannot read {path}: {cli.first_line(error)}") from None


def read_image(path, channels=1):
    """(H, W, channels) float32 pixel values of a PNG, JPEG or TIFF, as stored (not normalized).

    An alpha channel is dropped (it is transparency, not signal); grey saved as RGB counts as one
    channel.
    """
    image = _open(path)
    if image.mode in _CONVERT_TO_RGBA:
        image = image.convert("RGBA")
    pixels = np.asarray(image)
    if "A" in image.getbands():
        pixels = pixels[..., :-1]
    if pixels.ndim == 3 and (pixels.shape[-1] == 1 or (pixels == pixels[..., :1]).all()):
        pixels = pixels[..., 0]
    pixels = (pixels[..., None] if pixels.ndim == 2 else pixels).astype(np.float32)
    if pixels.shape[-1] != channels:
        raise DataError(
            f"{path} has {pixels.shape[-1]} colour channels (mode {image.mode}), "
            f"{channels} expected" + ("; convert it to grey levels" if channels == 1 else "")
        )
    check_size(pixels.shape[:2], path)
    return check_finite(pixels, path)


def read_mask(path):
    """(H, W) label values of a 2D mask file, as stored: multi-band masks are reduced to grey levels
    first, palette masks give their palette indices (the usual way to store labels in a PNG).

    A mask drawn in the alpha channel (one colour everywhere, often black, the shape in the
    transparency: some drawing tools export it so) is read from its alpha: its grey levels would be
    an empty mask. A mask whose colour and alpha both vary is read from its colour, alpha dropped.
    """
    image = _open(path)
    if "A" in image.getbands():
        pixels = np.asarray(image.convert("LA" if image.mode in ("LA", "La") else "RGBA"))
        colour, alpha = pixels[..., :-1], pixels[..., -1]
        if (colour == colour[:1, :1]).all() and not (alpha == alpha.flat[0]).all():
            return alpha
    if len(image.getbands()) > 1:
        image = image.convert("L")
    return check_finite(np.asarray(image), path)


def read_volume(path):
    """(array, nibabel image) of a NIfTI file: an (X, Y, Z) array in the stored order (no
    reorientation), scaling applied, dtype as stored; trailing axes of size 1 are dropped and a 2D
    image becomes (X, Y, 1)."""
    require_file(path)
    try:
        image = nib.load(path)
        array = np.asarray(
            image.dataobj
        )  # reads everything now: a truncated .gz fails here, with its name
    except Exception as error:  # nibabel raises ImageFileError, EOFError, zlib.error, OSError...
        raise DataError(f"cannot read {path}: {cli.first_line(error)}") from None
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    array = array[..., None] if array.ndim == 2 else array
    if array.ndim != 3:
        raise DataError(
            f"{path} has shape {shape_text(image.shape)}: one single-channel volume (X, Y, Z) "
            "is expected (nnU-Net stores each channel in its own _0000, _0001... file)"
        )
    check_size(array.shape[:2], path, "voxels in-plane")
    return check_finite(array, path), image


def label_map(labels: np.ndarray, path: str, num_classes: int = 2) -> np.ndarray:
    """Float32 label map from the values of a mask file. Two classes: at most two distinct values,
    foreground is `value > 0` (0/1, 0/255...). C classes: the values are the labels 0..C-1."""
    values = np.unique(labels)
    shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
    binary_rule = "a binary mask has 0 and one label (train.py --num-classes C takes label maps)"
    if len(values) > num_classes:
        rule = (
            binary_rule
            if num_classes == 2
            else f"at most {num_classes} with --num-classes {num_classes}"
        )
        raise DataError(f"mask {path} has {len(values)} distinct values ({shown}): {rule}")
    if num_classes == 2:
        if len(values) == 2 and values[0] != 0:  # which of the two is the background?
            raise DataError(f"mask {path} has the values {shown}: {binary_rule}")
        return (labels > 0).astype(np.float32)
    if not np.isin(values, np.arange(num_classes)).all():
        raise DataError(
            f"mask {path} has the values {shown}: labels of {num_classes} classes are "
            f"0..{num_classes - 1}"
        )
    return labels.astype(np.float32)


_MM_PER_UNIT = {"mm": 1.0, "micron": 1e-3, "meter": 1e3, "unknown": 1.0}  # unknown: NIfTI's mm


def voxel_size_mm(nifti: nib.spatialimages.SpatialImage) -> tuple[float, float, float]:
    """(X, Y, Z) voxel size of a NIfTI image in millimetres, from its header (a 2D image: Z 1)."""
    zooms = tuple(float(z) for z in nifti.header.get_zooms()[:3])
    scale = _MM_PER_UNIT.get(nifti.header.get_xyzt_units()[0], 1.0)
    return tuple(z * scale for z in zooms + (1.0,) * (3 - len(zooms)))


def shape_text(shape):
    return "x".join(str(s) for s in shape)


def describe(path):
    """One line: what a PNG, JPEG, TIFF or NIfTI file holds, as the loaders read it."""
    if is_nifti(path):
        array, image = read_volume(path)
        zooms = "x".join(f"{z:g}" for z in image.header.get_zooms()[:3])
        return (
            f"volume {shape_text(array.shape)} {array.dtype}, voxels {zooms} mm, "
            f"values {array.min():g} to {array.max():g}, {len(np.unique(array))} distinct"
        )
    pixels = read_image(path)
    return f"image {shape_text(pixels.shape)}, values {pixels.min():g} to {pixels.max():g}"


def describe_each(prog, paths, describe_one):
    """Print `path: describe_one(path)` for each path, or its DataError as one line on stderr.

    Returns:
        The exit status: 2 if any path was unreadable, else 0.
    """
    unreadable = 0
    for path in paths:
        try:
            print(f"{path}: {describe_one(path)}")
        except DataError as error:
            print(f"{prog}: error: {error}", file=sys.stderr)
            unreadable += 1
    return 2 if unreadable else 0


def main():
    parser = cli.argument_parser("imagefiles.py", __doc__)
    parser.add_argument("files", nargs="+", help="PNG, JPEG, TIFF or NIfTI files")
    return describe_each(parser.prog, parser.parse_args().files, describe)


if __name__ == "__main__":
    sys.exit(main())
