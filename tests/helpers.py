"""What several test files share: the checkout, tiny command lines, data folders written on the fly,
runs of the scripts. Test files import from here, never from each other.
"""

import contextlib
import errno
import json
import locale
import os
import subprocess
import warnings
import zlib
from pathlib import Path

import keras
import mlflow
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

import predict
import train
import unet
from tp4 import cli
from tp4.models import batchnorm
from tp4.tracking import registry

REPO = Path(__file__).resolve().parent.parent

TINY = (
    "--n-images 40 --image-size 32 --base-filters 8 --depth 3 --epochs 3 --batch-size 8 "
    "--patience 5 --foreground 0.1 --seed 1 --experiment tiny --precision float32 --xla off"
).split()


# Learns in a few epochs (test Dice about 0.87 after 6): the comparison below is about a real model.
LEARNS = (
    "--n-images 64 --image-size 32 --base-filters 8 --depth 3 --batch-size 8 --foreground 0.1 "
    "--noise 0.02 --lr 1e-2 --seed 1 --precision float32 --xla off"
).split()


@contextlib.contextmanager
def small_disk(folder, size="2m"):
    """`folder` (made if needed) as a small file system of its own while the block runs: a real
    tmpfs where this machine lets the test mount one (root). Yields whether it did; if not, a
    warning says so, and the test injects a full disk's error instead."""
    folder.mkdir(exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode:
        reason = mounted.stderr.decode().strip()
        warnings.warn(f"no tmpfs here ({reason}): a full disk injected", stacklevel=3)
    try:
        yield mounted.returncode == 0
    finally:
        if mounted.returncode == 0:  # lazily: a store's pooled connection may hold a file open
            subprocess.run(["umount", "--lazy", str(folder)], check=True)


def fill(folder):
    """Fill the file system of `folder` to its last byte with a file `filler`; returns its path."""
    path = folder / "filler"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)  # unbuffered: nothing left over
    try:
        while True:
            os.write(descriptor, b"\0" * 4096)
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(descriptor)
    return path


def wait_for_line(process, start):
    for line in process.stdout:
        if line.startswith(start):
            return
    pytest.fail(f"train.py ended (exit {process.wait()}) before printing {start!r}")


# Not the identity: axes swapped, anisotropic voxels, an offset. Nothing here may depend on it being
# simple.
AFFINE = np.array(
    [[0.0, -0.8, 0.0, 20.0], [0.9, 0.0, 0.0, -15.0], [0.0, 0.0, 2.5, 7.0], [0.0, 0.0, 0.0, 1.0]]
)


def itk_geometry(affine):
    """(spacing, origin, direction) in ITK's LPS terms of a NIfTI-style RAS `affine`."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    return tuple(spacing), tuple(lps[:3, 3]), tuple((lps[:3, :3] / spacing).ravel())


def write_volume(path, array, affine=AFFINE, intercept=-1024.0):
    """Write an (X, Y, Z) `array` placed by `affine` (voxel -> RAS mm): a NIfTI (nibabel), an NRRD
    or MetaImage (SimpleITK), or a DICOM CT series when `path` has no suffix: a folder of one file
    per slice, named in the reverse of their order along the normal (the reader must sort them),
    int16 values stored as `value - intercept` with that rescale intercept. Returns `path`."""
    path = Path(path)
    if path.name.endswith((".nii", ".nii.gz")):
        nib.save(nib.Nifti1Image(array, affine), path)
        return path
    image = sitk.GetImageFromArray(np.asarray(array).transpose())
    spacing, origin, direction = itk_geometry(affine)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    if path.suffix:
        sitk.WriteImage(image, str(path))
        return path
    path.mkdir(parents=True)
    uid = f"1.2.826.0.1.3680043.8.498.{zlib.crc32(str(path).encode())}"  # one per series
    cosines = np.reshape(direction, (3, 3))[:, :2].T.ravel()  # row, then column direction
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    process_locale = locale.setlocale(locale.LC_ALL)
    depth = image.GetDepth()
    for z in range(depth):
        slice_ = sitk.Cast(image[:, :, z], sitk.sitkInt16)
        position = image.TransformIndexToPhysicalPoint((0, 0, z))
        tags = {
            "0008|0060": "CT",
            "0020|000d": uid + ".1",
            "0020|000e": uid + ".2",
            "0008|0018": f"{uid}.3.{z}",
            "0020|0013": str(z + 1),
            "0020|0037": "\\".join(f"{c:.10g}" for c in cosines),
            "0020|0032": "\\".join(f"{p:.10g}" for p in position),
            "0028|1052": f"{intercept:g}",
            "0028|1053": "1",
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(path / f"IM{depth - z:04d}.dcm"))
        writer.Execute(slice_)
    # GDCM's writer leaves the process in the "C" locale: the session's later text pipes
    # (subprocess output, open()) would decode as ASCII.
    locale.setlocale(locale.LC_ALL, process_locale)
    return path


TINY_REAL = (
    "--image-size 32 --base-filters 8 --depth 3 --epochs 1 --batch-size 8 --experiment tiny".split()
)


def blob(shape, rng):
    """A binary mask with one random box in it."""
    mask = np.zeros(shape, np.uint8)
    corner = [rng.integers(0, s // 2) for s in shape]
    mask[tuple(slice(c, c + max(2, s // 3)) for c, s in zip(corner, shape))] = 1
    return mask


def write_png_folder(root, shapes=((32, 32),) * 4, seed=0):
    """images/caseI.png (8-bit grey) and masks/caseI.png (0/255); returns the arrays by case."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    written = {}
    for i, shape in enumerate(shapes):
        image, mask = rng.integers(0, 256, shape).astype(np.uint8), blob(shape, rng) * 255
        Image.fromarray(image).save(root / "images" / f"case{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"case{i}.png")
        written[f"case{i}"] = (image, mask)
    return written


def write_msd_folder(root, n=3, shape=(32, 32, 8), seed=0, suffixes=None):
    """imagesTr/case_00I_0000.nii.gz + labelsTr/case_00I.nii.gz (the last case as plain .nii), or
    with `suffixes` (image's, label's: "" for a DICOM series) int16 images in those formats. Returns
    the (image, label) arrays by case, as stored."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    written = {}
    for i in range(n):
        image, label = (rng.random(shape) * 1000 - 200).astype(np.float32), blob(shape, rng)
        ext = ".nii" if i == n - 1 else ".nii.gz"
        image_ext, label_ext = suffixes or (ext, ext)
        image = image.astype(np.int16) if suffixes else image
        write_volume(root / "imagesTr" / f"case_{i:03d}_0000{image_ext}", image)
        write_volume(root / "labelsTr" / f"case_{i:03d}{label_ext}", label)
        written[f"case_{i:03d}"] = (image, label)
    return written


def ras(array, affine=AFFINE):
    """`array`, stored as `affine` places it, in nibabel's closest canonical (RAS) order: what the
    loaders give."""
    return nib.apply_orientation(array, nib.io_orientation(affine))


def from_ras(array, affine=AFFINE):
    """The inverse of `ras`: an array in RAS order back in the order `affine` stores it."""
    ras_axes = nib.orientations.axcodes2ornt("RAS")
    return nib.apply_orientation(
        array, nib.orientations.ornt_transform(ras_axes, nib.io_orientation(affine))
    )


def crafted_run(experiment, argv, status, tags=None, script=train):
    """A run as `script` (train, conv3d) starts one (params skipped), ended with `status`; no
    training."""
    args = script.parse_args(argv + ["--experiment", experiment])
    cli.setup()  # as train.main: MLflow's INFO lines (a new experiment) off stderr
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="crafted", tags=tags) as run:
        mlflow.log_dict(args.to_json(), "config.json")
    mlflow.MlflowClient().set_terminated(run.info.run_id, status)
    return run.info.run_id, args.to_json()


def refused_in_one_line(argv, capsys):
    """train.main(argv)'s one error line, its exit status 2 checked."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: "), err
    return err[0]


def run_predict(args, capsys):
    """predict.main -> (exit code, stdout lines, stderr lines); float32 without XLA unless `args`
    say otherwise (no speed probe)."""
    if "--precision" not in args:
        args = [*args, "--precision", "float32", "--xla", "off"]
    try:
        predict.main(args)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


def log_tiny_model(registered_name=None, output_bias=0.0, seed=0):
    """A tiny U-Net (32x32, 8 filters) logged as train.py logs its model, in a run of its own;
    returns (the Keras model, the run's id, MLflow's ModelInfo). A large `output_bias` makes every
    pixel foreground (> 0) or background (< 0)."""
    keras.utils.set_random_seed(seed)
    model = unet.build_unet(
        (32, 32, 1), 8, 2, batch_norm=batchnorm.FusedBatchNormalization, output_bias=output_bias
    )
    mlflow.set_experiment("logged")
    with mlflow.start_run() as run:
        example = np.random.default_rng(seed).random((1, 32, 32, 1), np.float32)
        info = registry.log_keras_model(
            model, (example, model.predict(example, verbose=0)), registered_name
        )
    return model, run.info.run_id, info


def write_anisotropic_folder(root, spacings, shape=(32, 32, 8), seed=0, modality=None):
    """An MSD folder of learnable cases (a bright box on noise) with the given voxel sizes, each
    axis-aligned (affine diag(spacing)); a dataset.json naming `modality` if given. Returns the
    image paths."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    paths = []
    for i, spacing in enumerate(spacings):
        label = blob(shape, rng)
        image = (rng.normal(100, 10, shape) + 100.0 * label).astype(np.float32)
        affine = np.diag([*spacing, 1.0])
        paths.append(write_volume(root / "imagesTr" / f"case_{i:03d}_0000.nii.gz", image, affine))
        write_volume(root / "labelsTr" / f"case_{i:03d}.nii.gz", label, affine)
    if modality:
        (root / "dataset.json").write_text(json.dumps({"modality": {"0": modality}}))
    return paths
