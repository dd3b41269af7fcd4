"""What several test files share: the checkout, tiny command lines, data folders written on the fly,
runs of the scripts. Test files import from here, never from each other.
"""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import predict
import train

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


def write_msd_folder(root, n=3, shape=(32, 32, 8), seed=0):
    """imagesTr/case_00I_0000.nii.gz + labelsTr/case_00I.nii.gz (the last case as plain .nii)."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    written = {}
    for i in range(n):
        image, label = (rng.random(shape) * 1000 - 200).astype(np.float32), blob(shape, rng)
        ext = ".nii" if i == n - 1 else ".nii.gz"
        nib.save(nib.Nifti1Image(image, AFFINE), root / "imagesTr" / f"case_{i:03d}_0000{ext}")
        nib.save(nib.Nifti1Image(label, AFFINE), root / "labelsTr" / f"case_{i:03d}{ext}")
        written[f"case_{i:03d}"] = (image, label)
    return written


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
