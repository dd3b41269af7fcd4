"""A dataset of anisotropic voxels made from mni-wm: what the plan is measured on (REPORT.md).

What this module teaches: thick slices are the common case of clinical scans (1 x 1 mm in-plane,
3 mm or more between slices). The built-in 1 mm MNI152 volume is resampled to such a grid with
the plan's own resampling (tp4/planning/preprocess.py: third order for the T1, linear on one-hot
for the white-matter mask), then cut into blocks that are the cases of an MSD folder (imagesTr/,
labelsTr/, dataset.json), so that the usual `--data-dir` reads it and splits it by case.

    python plan.py mni-wm --write DIR --spacing 1 1 3
"""

import json
import os

import nibabel as nib
import numpy as np

from tp4.images import mni
from tp4.images.imagefiles import DataError
from tp4.planning import preprocess

BLOCKS = (2, 4)  # cases along X (left, right) and Y (posterior to anterior)


def write_mni(folder: str, spacing=(1.0, 1.0, 3.0), blocks=BLOCKS) -> list[str]:
    """Write mni-wm resampled to `spacing` as an MSD dataset of blocks[0] x blocks[1] cases.

    Args:
        folder: a new or empty folder (an existing dataset is never overwritten).
        spacing: the voxel size (mm) of the written volumes, along X, Y, Z.
        blocks: how many cases along X and along Y.

    Returns:
        The case names written.

    Raises:
        DataError: `folder` exists and is not empty.
    """
    if os.path.isdir(folder) and os.listdir(folder):
        raise DataError(f"{folder} is not empty: write the dataset into a new folder")
    t1, mask, voxel_size = mni.mni_wm_volume()
    image = preprocess.resample(t1, voxel_size, spacing)
    labels = preprocess.resample(mask.astype(np.uint8), voxel_size, spacing, labels="linear")
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    x_edges = np.linspace(0, image.shape[0], blocks[0] + 1).astype(int)
    y_edges = np.linspace(0, image.shape[1], blocks[1] + 1).astype(int)
    names = []
    for i, (x0, x1) in enumerate(zip(x_edges, x_edges[1:])):
        for j, (y0, y1) in enumerate(zip(y_edges, y_edges[1:])):
            name = f"mni_{i}{j}"
            affine = np.diag([*spacing, 1.0])
            affine[:3, 3] = np.multiply([x0, y0, 0], spacing)  # each block where it lay
            for sub, array, suffix in (
                ("imagesTr", image[x0:x1, y0:y1], "_0000"),
                ("labelsTr", labels[x0:x1, y0:y1], ""),
            ):
                path = os.path.join(folder, sub, f"{name}{suffix}.nii.gz")
                nib.save(nib.Nifti1Image(array, affine), path)
            names.append(name)
    description = {
        "name": f"mni-wm at {'x'.join(f'{s:g}' for s in spacing)} mm",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "white matter"},
        "numTraining": len(names),
        "file_ending": ".nii.gz",
    }
    with open(os.path.join(folder, "dataset.json"), "w") as file:
        json.dump(description, file, indent=2)
    return names
