"""The plan's preprocessing of one case: resampled to the target spacing, normalized by modality.

What this module teaches: images are resampled with third-order splines (smooth, no blocky
edges); label maps as nnU-Net does, each class's one-hot map interpolated linearly and every voxel
given its most probable class (smoother borders than nearest neighbour, and a label stays a label;
nearest is kept as the simple alternative); probabilities linearly. A prediction at the target
spacing goes back to the input's grid the same way, to the input's exact shape.
"""

import numpy as np
from scipy import ndimage

LABELS = ("linear", "nearest")  # how label maps are resampled


def output_shape(shape, spacing, target) -> tuple:
    """The shape of a grid of `shape` voxels of `spacing` once resampled to voxels of `target`."""
    new = np.round(np.asarray(shape) * np.asarray(spacing, float) / np.asarray(target, float))
    return tuple(int(s) for s in np.maximum(new, 1))


def _zoom(array, shape, order):
    factors = np.asarray(shape, float) / np.asarray(array.shape[: len(shape)])
    factors = (*factors, *[1.0] * (array.ndim - len(shape)))  # channels stay
    return ndimage.zoom(array, factors, order=order, grid_mode=True, mode="nearest")


def resample(
    array: np.ndarray, spacing, target, labels: str | bool = False, shape=None, order: int = 3
) -> np.ndarray:
    """`array` from voxels of `spacing` to voxels of `target` (mm), or to `shape` exactly.

    Args:
        array: (X, Y, Z) image or label map, or (X, Y, Z, C) probabilities (order=1).
        spacing, target: voxel sizes along each spatial axis.
        labels: a label map: "linear" (True: nnU-Net's one-hot interpolation) or "nearest".
        shape: the output's spatial shape (to go back to an input's grid), instead of the
            spacings' ratio.
        order: the spline order of an image (3) or probabilities (1).

    Returns:
        The resampled array: float32, or of the label map's dtype.
    """
    spatial = array.shape[: len(spacing)]
    shape = tuple(shape) if shape is not None else output_shape(spatial, spacing, target)
    if not labels:
        return _zoom(array.astype(np.float32), shape, order).astype(np.float32)
    if labels == "nearest":
        return _zoom(array, shape, 0).astype(array.dtype)
    classes = np.unique(array)
    scores = [_zoom((array == c).astype(np.float32), shape, 1) for c in classes]
    return classes[np.argmax(np.stack(scores), axis=0)].astype(array.dtype)


def normalize(image: np.ndarray, normalization: dict) -> np.ndarray:
    """The plan's normalization: CT clipped and z-scored with the dataset's foreground
    statistics, anything else z-scored with its own."""
    image = image.astype(np.float32)
    if normalization["scheme"] == "CT":
        low, high = normalization["clip"]
        return (np.clip(image, low, high) - normalization["mean"]) / max(normalization["std"], 1e-8)
    return (image - image.mean()) / max(float(image.std()), 1e-8)
