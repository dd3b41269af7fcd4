"""The plan's preprocessing of one case: resampled to the target spacing, normalized by modality.

What this module teaches: images are resampled with third-order splines (smooth, no blocky
edges), label maps with nearest neighbour (a label stays a label); a prediction at the target
spacing goes back to the input's grid the same way, to the input's exact shape.
"""

import numpy as np
from scipy import ndimage


def resample(array: np.ndarray, spacing, target, labels: bool = False, shape=None) -> np.ndarray:
    """`array` from voxels of `spacing` to voxels of `target` (mm), or to `shape` exactly.

    Args:
        array: (X, Y, Z) image or label map.
        spacing, target: voxel sizes along each axis.
        labels: nearest neighbour (order 0) instead of third-order splines.
        shape: the output's shape (to go back to an input's grid), instead of the spacings' ratio.
    """
    if shape is None:
        shape = np.round(np.asarray(array.shape) * np.asarray(spacing) / np.asarray(target))
    factors = np.asarray(shape, float) / np.asarray(array.shape)
    order = 0 if labels else 3
    out = ndimage.zoom(
        array.astype(np.float32), factors, order=order, grid_mode=True, mode="nearest"
    )
    return np.rint(out).astype(array.dtype) if labels else out


def normalize(image: np.ndarray, normalization: dict) -> np.ndarray:
    """The plan's normalization: CT clipped and z-scored with the dataset's foreground
    statistics, anything else z-scored with its own."""
    image = image.astype(np.float32)
    if normalization["scheme"] == "CT":
        low, high = normalization["clip"]
        return (np.clip(image, low, high) - normalization["mean"]) / max(normalization["std"], 1e-8)
    return (image - image.mean()) / max(float(image.std()), 1e-8)
