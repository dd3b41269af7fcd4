"""The files of a prediction: which inputs, which outputs, written whole or not at all.

What this module teaches: a batch job leaves no half-written file. Each output is written under a
temporary name and renamed when complete (`write_outputs`); the output folder is checked before the
model is loaded (`check_output`), and inputs that would write the same file are refused before
anything is written (`refuse_shared_outputs`). A NIfTI mask keeps the input's affine and header, so
that a viewer (ITK-SNAP, 3D Slicer, FSLeyes) lays it over the scan in millimetres.
"""

import os
import tempfile

import numpy as np
from PIL import Image

from tp4.images import imagefiles
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


def list_inputs(paths):
    """The files to segment: files as given, folders expanded to their image files (sorted)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = imagefiles.list_files(path)
            if not found:
                raise DataError(f"{path} holds no PNG, JPEG, TIFF or NIfTI file")
            files += found
        else:
            files.append(path)  # a missing or unreadable file is reported when its turn comes
    if not any(os.path.lexists(path) for path in files):  # a typo: say so before loading the model
        raise DataError(f"no such file: {', '.join(files)}")
    return files


def output_paths(output, path):
    """(mask path, overlay path) for one input: <name>_mask.<same format>, <name>_overlay.png."""
    ext = imagefiles.suffix(path)
    ext = ".png" if ext in (".jpg", ".jpeg") else ext
    name = imagefiles.stem(path)
    return os.path.join(output, f"{name}_mask{ext}"), os.path.join(output, f"{name}_overlay.png")


def refuse_shared_outputs(files, output):
    """Refuse, before writing anything, inputs that would write the same file: a.png and a.jpg
    (both a_mask.png), a.png and a.nii.gz (both a_overlay.png)."""
    writers = {}
    for path in files:
        for written in output_paths(output, path):
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


def save_mask(path, mask, nifti):
    """Write uint8 mask values: an image file (PNG, TIFF), or a NIfTI over the input's voxels."""
    if nifti is None:
        Image.fromarray(mask.astype(np.uint8)).save(path)
        return
    # The input's class (NIfTI-1 or -2), affine and header: the mask lands on the same voxels in
    # millimetres. A new data array resets the header's intensity scaling, and uint8 keeps the
    # labels exact.
    out = type(nifti)(mask.astype(np.uint8).reshape(nifti.shape), nifti.affine, nifti.header)
    out.set_data_dtype(np.uint8)
    out.header["cal_min"], out.header["cal_max"] = 0, max(1, int(mask.max()))
    out.to_filename(path)
