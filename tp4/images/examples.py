"""What a dataset gives the networks: `Examples`, and how one volume becomes them.

What this module teaches:
- every example keeps its name (file, case and slice or patch), its group (the split unit) and its
  voxel size, for the per-case test table and the surface distances;
- one (X, Y, Z) volume gives 2D examples as slices along the last axis (axial), fitted to the
  network by geometry.fit, or 3D examples as (D, H, W) patches cut by geometry.tile, D along that
  same axis. Blank slices and patches (constant image: outside the body, or padding) are skipped.

datasets.py (folders) and mni.py (the built-in volume) both build their examples here.
"""

from dataclasses import dataclass

import numpy as np

import data
from tp4.images import geometry
from tp4.images.imagefiles import DataError


@dataclass
class Examples:
    """Network-ready examples and where they came from."""

    images: np.ndarray  # (N, H, W, 1) or (N, D, H, W, 1), float32 in [0, 1]
    masks: np.ndarray  # same shape, float32 0/1
    groups: np.ndarray  # (N,) group id: the examples of one group always land in the same split
    group_names: list  # name of each group id: a file, a case, "slices 8-15"
    source: str  # the folder path or the built-in name
    layout: str  # "images+masks", "msd" or "builtin"
    original_shapes: list  # spatial shape of every file read, before fitting
    case_ids: list | None = None  # name of each example: "case_001 slice 12" (None: its group's)
    spacing: np.ndarray | None = None  # (N, spatial dims) voxel size of each example (None: 1)
    spacing_unit: str = "px"  # "mm" (volumes) or "px" (pixels of the image files)
    orientations: list | None = None  # axis codes each volume was stored in ("LPS"), now RAS


def percentiles(image, mask, spacing):
    """The project's preprocessing of a volume: percentiles 0.5-99.5 to [0, 1], its grid kept."""
    return data.normalize_intensity(image.astype(np.float32)), mask, spacing


def volume_examples(volume, mask, shape, name, voxel_size=(1.0, 1.0, 1.0)):
    """Examples from one normalized (X, Y, Z) volume and its mask: 2D slices along the last axis
    fitted to (H, W), or 3D (D, H, W) patches with D along that axis. Returns (images, masks,
    positions along the slice axis, where each example is ("slice 3", "patch 0,16,0"), the voxel
    size of the examples); blank slices or patches are skipped."""
    if len(shape) == 2:
        kept = [z for z in range(volume.shape[-1]) if np.ptp(volume[..., z]) > 0]
        fits = [geometry.fit(volume[..., z], shape) for z in kept]
        images = [fitted for fitted, _ in fits]
        masks = [geometry.fit(mask[..., z], shape, order=0)[0] for z in kept]
        where = [f"slice {z}" for z in kept]
        # Every slice has the same shape, hence the same resize: its pixels grow by original/scaled.
        grow = np.divide(fits[0][1].original, fits[0][1].scaled) if fits else 1.0
        spacing = np.multiply(voxel_size[:2], grow)
    else:
        both = np.stack(
            [np.moveaxis(volume, -1, 0), np.moveaxis(mask, -1, 0)], axis=-1
        )  # (D, H, W, 2)
        patches, corners = geometry.tile(both, shape)
        chosen = [i for i, patch in enumerate(patches) if np.ptp(patch[..., 0]) > 0]
        kept = [corners[i][0] for i in chosen]
        images, masks = patches[chosen, ..., 0], patches[chosen, ..., 1]
        where = ["patch " + ",".join(str(c) for c in corners[i]) for i in chosen]
        spacing = np.array([voxel_size[2], voxel_size[0], voxel_size[1]])  # (D, H, W) = (Z, X, Y)
    if not kept:
        raise DataError(f"{name}: every slice is blank (a constant image)")
    return np.stack(images)[..., None], np.stack(masks)[..., None], np.array(kept), where, spacing
