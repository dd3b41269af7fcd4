"""The files of a prediction: which inputs, which outputs, written whole or not at all.

What this module teaches: a batch job leaves no half-written file and never replaces an input. Each
output is written under a temporary name and renamed when complete (`write_outputs`); the output
folder is checked before the model is loaded (`check_output`); outputs that would replace an input,
or a file already in an input's folder (a ground-truth `a_mask.png` next to `a.png`), and inputs
that would write the same file are refused before anything is written (`refuse_shared_outputs`).
A folder given as input is listed without the files named as predict.py names its outputs
(`<name>_mask.*`, `<name>_overlay.png`): a rerun never segments its own masks. A volume's mask
keeps the input's grid (volumes.write_mask: a NIfTI's affine and header; an NRRD's, MetaImage's or
DICOM series' spacing, origin and direction), so that a viewer (ITK-SNAP, 3D Slicer, FSLeyes) lays
it over the scan in millimetres.
"""

import os
import tempfile

import numpy as np
from PIL import Image

from tp4.images import imagefiles, volumes
from tp4.images.imagefiles import DataError


def check_output(folder):
    """ValueError if masks cannot be written in `folder` (created later, once the model is loaded):
    it names a file, lies under one, or its nearest existing folder cannot be written in (no
    permission, a read-only disk)."""
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--output {folder}: {existing} exists and is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(
            f"--output {folder}: cannot write in {existing} ({error.strerror})"
        ) from None


OUTPUT_TAGS = ("_mask", "_overlay")  # output_paths: <name>_mask.<ext>, <name>_overlay.png


def is_output_name(path):
    """Whether `path` is named as predict.py names its outputs (or as masks are often named)."""
    return imagefiles.stem(path).endswith(OUTPUT_TAGS)


def list_inputs(paths):
    """The files to segment: files and DICOM series folders as given, other folders expanded to
    their image and volume files and series sub-folders (sorted), less those named like outputs
    (`is_output_name`; one line says which were left out).

    Raises:
        DataError: a folder holds no image file to segment, or no input exists.
    """
    files = []
    for path in paths:
        if volumes.is_series(path):
            files.append(path)
        elif os.path.isdir(path):
            series = [f for f in volumes.list_volumes(path) if volumes.is_series(f)]
            found = sorted(imagefiles.list_files(path) + series)
            skipped = [f for f in found if is_output_name(f)]
            found = [f for f in found if not is_output_name(f)]
            if skipped:
                names = ", ".join(os.path.basename(f) for f in skipped[:3])
                more = ", ..." if len(skipped) > 3 else ""
                print(
                    f"{path}: left out {len(skipped)} file(s) named like predict.py's outputs "
                    f"({names}{more}); give them by name to segment them",
                    flush=True,
                )
            if not found:
                raise DataError(
                    f"{path} holds no PNG, JPEG, TIFF, NIfTI, NRRD, MHA/MHD file or DICOM series "
                    "to segment"
                )
            files += found
        else:
            files.append(path)  # a missing or unreadable file is reported when its turn comes
    if not any(os.path.lexists(path) for path in files):  # a typo: say so before loading the model
        raise DataError(f"no such file: {', '.join(files)}")
    return files


def output_paths(output, path):
    """(mask path, overlay path) for one input: <name>_mask.<same format>, <name>_overlay.png (a
    DICOM series folder: <folder>_mask.nrrd)."""
    ext = volumes.mask_suffix(path)
    ext = ".png" if ext in (".jpg", ".jpeg") else ext
    name = imagefiles.stem(path)
    return os.path.join(output, f"{name}_mask{ext}"), os.path.join(output, f"{name}_overlay.png")


def _identity(path):
    """What makes two names one file: (device, inode) if it exists (links included), else its
    resolved path."""
    try:
        status = os.stat(path)
        return status.st_dev, status.st_ino
    except OSError:
        return os.path.realpath(path)


def refuse_shared_outputs(files, output):
    """Refuse, before writing anything, outputs that would replace a file they must not:

    - an input (`--output` is the input folder and `a_mask.png` is given as an input too, or is
      the same file under another name or link);
    - any file already in an input's folder, when `--output` is that folder: `a_mask.png` next to
      `a.png` may be its ground truth, not an earlier prediction;
    - the output of another input: a.png and a.jpg (both a_mask.png), a.png and a.nii.gz (both
      a_overlay.png).

    Raises:
        DataError: one line naming the file, the input, and what to do.
    """
    inputs = {_identity(path): path for path in files}
    input_folders = {_identity(os.path.dirname(path) or "."): path for path in files}
    in_input_folder = input_folders.get(_identity(output))
    writers = {}
    for path in files:
        for written in output_paths(output, path):
            if _identity(written) in inputs:
                raise DataError(
                    f"--output {output}: {path}'s output {written} would replace the input "
                    f"{inputs[_identity(written)]}; give another --output folder"
                )
            if in_input_folder and os.path.lexists(written):
                raise DataError(
                    f"--output {output} is the folder of the input {in_input_folder}, and "
                    f"{written} is already there (a ground-truth mask? an earlier prediction?): "
                    "give another --output folder"
                )
            if written in writers:
                raise DataError(
                    f"{writers[written]} and {path} would both write {written}: give them "
                    "different --output folders"
                )
            writers[written] = path


def write_outputs(writers):
    """Run each writer(path) on a temporary name in the same folder, then rename them all: never a
    partial file."""
    done = []
    try:
        for path, write in writers.items():
            partial = os.path.join(os.path.dirname(path), f".partial-{os.path.basename(path)}")
            done.append((partial, path))
            write(partial)
        for partial, path in done:
            os.replace(partial, path)
    finally:
        for partial, _ in done:
            if os.path.exists(partial):
                os.remove(partial)


def save_mask(path, mask, volume):
    """Write uint8 mask values: an image file (PNG, TIFF), or over the voxels of the input
    `volume` (volumes.Volume) in its format."""
    if volume is None:
        Image.fromarray(mask.astype(np.uint8)).save(path)
    else:
        volumes.write_mask(path, mask, volume)
