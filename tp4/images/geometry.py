"""Geometry between real images and a network of fixed size: fit, undo the fit, cut into patches.

What this script teaches:
- a U-Net built for 128x128 takes nothing else, while real images come in every size. The rule used
  here, for training and prediction alike (the network must see at prediction what it saw in
  training): **shrink to fit, never enlarge, then pad**. An image larger than the network is resized
  by one factor for all axes (the aspect ratio is kept, anatomy is not stretched) until it fits; the
  rest is zero-padded, centred. An image that already fits is only padded, so undoing it is exact;
- the transform is recorded (`Transform`) and undone on the prediction (`unfit`): crop the padding,
  resize back to the original size. A mask of the original geometry comes out, pixel for pixel over
  the input;
- images are resized with linear interpolation after a Gaussian anti-aliasing blur (sub-sampling
  without it turns fine texture into false patterns); masks with nearest neighbour, so they stay
  binary: a mask is never interpolated into values between 0 and 1;
- a volume is cut into non-overlapping patches of the network's shape (`tile`) for training, and
  segmented with overlapping windows whose outputs are blended (`sliding_window_predict`: constant
  or Gaussian weights, as in MONAI and nnU-Net) when it is larger than the network's patch;
- test-time mirroring (`predict_mirrored`, nnU-Net's): the network also sees the input flipped along
  every combination of spatial axes (4 ways in 2D, 8 in 3D), each output is flipped back, and the
  probabilities are averaged: a cheap ensemble, for 4 or 8 times the prediction time.

Every function works on 2D (H, W[, C]) and 3D (D, H, W[, C]) arrays: the spatial axes come first.

    python -m tp4.images.geometry  # a worked example: a 300x200 image fitted into 128x128 and back
"""

import itertools
from collections import namedtuple
from collections.abc import Callable
from typing import Literal

import numpy as np
from scipy import ndimage

from tp4 import cli

# original: spatial shape of the input; scaled: after the resize (== original if none); pad:
# (before, after) per axis
Transform = namedtuple("Transform", "original scaled pad")


def resize(array, shape, order=1):
    """Resize the leading len(shape) axes of `array` to `shape` (trailing axes, e.g. channels, are
    kept).

    order=1: linear, with an anti-aliasing blur on the axes that shrink (for images and
    probabilities); order=0: nearest neighbour, no blur (for masks and labels: no new values
    appear). Pixel centres are aligned (the convention of Pillow, OpenCV and scikit-image), not the
    corners.
    """
    shape, spatial = tuple(int(s) for s in shape), array.shape[: len(shape)]
    if shape == spatial:
        return array.copy()
    factors = [s / n for s, n in zip(spatial, shape)]
    if order > 0 and any(f > 1 for f in factors):
        sigma = [max(0.0, (f - 1) / 2) for f in factors] + [0.0] * (array.ndim - len(shape))
        array = ndimage.gaussian_filter(
            array.astype(np.float32), sigma
        )  # the scikit-image anti-aliasing rule
    grid = np.meshgrid(
        *[(np.arange(n) + 0.5) * f - 0.5 for n, f in zip(shape, factors)], indexing="ij"
    )
    if array.ndim == len(shape):
        return ndimage.map_coordinates(array, grid, order=order, mode="nearest")
    channels = array.reshape(*spatial, -1)
    out = [
        ndimage.map_coordinates(channels[..., c], grid, order=order, mode="nearest")
        for c in range(channels.shape[-1])
    ]
    return np.stack(out, axis=-1).reshape(*shape, *array.shape[len(shape) :])


def fit(array, target, order=1, shrink=True):
    """Fit the leading axes of `array` to `target`: shrink (aspect ratio kept) if larger, then
    zero-pad, centred.

    Returns (fitted, Transform). shrink=False only pads the axes smaller than `target` and leaves
    larger axes as they are (for sliding-window prediction, which takes any volume at least as large
    as the patch).
    """
    target = tuple(int(t) for t in target)
    spatial = array.shape[: len(target)]
    scale = min(1.0, *(t / s for t, s in zip(target, spatial))) if shrink else 1.0
    scaled = tuple(
        max(1, min(t, round(s * scale))) if scale < 1 else s for s, t in zip(spatial, target)
    )
    resized = resize(array, scaled, order) if scaled != spatial else array
    pad = tuple(
        (max(t - s, 0) // 2, max(t - s, 0) - max(t - s, 0) // 2) for s, t in zip(scaled, target)
    )
    fitted = np.pad(resized, list(pad) + [(0, 0)] * (array.ndim - len(target)))
    return fitted, Transform(tuple(spatial), scaled, pad)


def unfit(array, transform, order=1):
    """Undo `fit`: crop the padding, then resize back to the original shape (exact when fit only
    padded)."""
    crop = tuple(
        slice(before, array.shape[i] - after) for i, (before, after) in enumerate(transform.pad)
    )
    cropped = array[crop]
    return (
        resize(cropped, transform.original, order)
        if transform.scaled != transform.original
        else cropped
    )


def window_starts(size, patch, stride):
    """Start indices of windows of `patch` along an axis of `size` >= patch; the last one ends at
    the edge."""
    starts = list(range(0, size - patch + 1, stride))
    return starts if starts[-1] == size - patch else starts + [size - patch]


def window_corners(shape, patch, strides):
    """Corners of the windows that cover `shape` with steps `strides` (one window list per axis,
    crossed)."""
    return list(
        itertools.product(*(window_starts(s, p, t) for s, p, t in zip(shape, patch, strides)))
    )


def tile(array, patch):
    """Non-overlapping patches covering `array`, whose spatial axes are zero-padded at the end to
    multiples of `patch`. Returns (patches stacked on a new first axis, their corners)."""
    spatial = array.shape[: len(patch)]
    padded_shape = [-(-s // p) * p for s, p in zip(spatial, patch)]
    padding = [(0, t - s) for s, t in zip(spatial, padded_shape)] + [(0, 0)] * (
        array.ndim - len(patch)
    )
    padded = np.pad(array, padding)
    corners = window_corners(padded_shape, patch, patch)
    patches = [padded[tuple(slice(c, c + p) for c, p in zip(corner, patch))] for corner in corners]
    return np.stack(patches), corners


def patch_weights(
    patch_shape, weighting: Literal["constant", "gaussian"] = "gaussian", sigma_scale=0.125
):
    """Blending weights of one patch: constant, or a Gaussian (sigma = patch/8, as nnU-Net) that
    trusts the patch centre, where the network saw the most context, more than its borders."""
    if weighting == "constant":
        return np.ones(patch_shape, np.float32)
    if weighting != "gaussian":
        raise ValueError(f"weighting must be 'constant' or 'gaussian', got {weighting!r}")
    axes = [
        np.exp(-0.5 * ((np.arange(s) - (s - 1) / 2) / (s * sigma_scale)) ** 2) for s in patch_shape
    ]
    weights = np.prod(np.meshgrid(*axes, indexing="ij"), axis=0)
    return np.maximum(weights / weights.max(), 1e-3).astype(
        np.float32
    )  # never 0: every voxel gets a vote


def mirror_axes(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every combination of the spatial axes of a batch (N, *spatial, C), the empty one included.

    Args:
        spatial_dims: 2 for images, 3 for volumes.

    Returns:
        2**spatial_dims tuples of axes: [(), (1,), (2,), (1, 2)] for images.
    """
    axes = range(1, spatial_dims + 1)
    return [flip for r in range(spatial_dims + 1) for flip in itertools.combinations(axes, r)]


def predict_mirrored(predict: Callable[[np.ndarray], np.ndarray], batch: np.ndarray) -> np.ndarray:
    """Test-time mirroring: the mean of `predict` over every flip of the batch's spatial axes, each
    output flipped back first (nnU-Net's mirroring).

    Args:
        predict: batch (N, *spatial, C) -> probabilities (N, *spatial, classes).
        batch: the inputs.

    Returns:
        The averaged probabilities, float32.
    """
    flips = mirror_axes(batch.ndim - 2)
    total = sum(np.flip(predict(np.ascontiguousarray(np.flip(batch, f))), f) for f in flips)
    return (total / len(flips)).astype(np.float32)


def sliding_window_predict(
    model, volume, overlap=0.5, weighting="gaussian", batch_size=4, tta=False
):
    """Segment a (D, H, W, C) volume at least as large as the model's patch with overlapping patches
    whose outputs are blended with `patch_weights`; tta: each window is predicted with
    test-time mirroring (`predict_mirrored`). Returns (D, H, W, classes) probabilities."""
    patch = tuple(model.input_shape[1:4])
    if volume.ndim != 4 or volume.shape[-1] != model.input_shape[-1]:
        raise ValueError(
            f"expected a (D, H, W, {model.input_shape[-1]}) volume, got shape {volume.shape}"
        )
    if any(v < p for v, p in zip(volume.shape, patch)):
        raise ValueError(f"volume {volume.shape[:3]} is smaller than the model's patch {patch}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    strides = [max(1, round(p * (1 - overlap))) for p in patch]
    corners = window_corners(volume.shape[:3], patch, strides)
    weights = patch_weights(patch, weighting)[..., None]

    def run(batch):
        # predict_on_batch: the model's compiled predict step (XLA if its jit_compile says so).
        return np.asarray(model.predict_on_batch(batch))

    total = np.zeros((*volume.shape[:3], model.output_shape[-1]), np.float32)
    norm = np.zeros((*volume.shape[:3], 1), np.float32)
    for first in range(0, len(corners), batch_size):
        windows = [
            tuple(slice(c, c + p) for c, p in zip(corner, patch))
            for corner in corners[first : first + batch_size]
        ]
        batch = np.stack([volume[w] for w in windows])
        predictions = predict_mirrored(run, batch) if tta else run(batch)
        for window, prediction in zip(windows, predictions):
            total[window] += weights * prediction
            norm[window] += weights
    return total / norm


def main():
    parser = cli.argument_parser("geometry.py", __doc__)
    size = cli.at_least(1)
    parser.add_argument("--height", type=size, default=300, help="height of the example image")
    parser.add_argument("--width", type=size, default=200, help="width of the example image")
    parser.add_argument("--size", type=size, default=128, help="network size (square)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    mask = ndimage.gaussian_filter(rng.random((args.height, args.width)), 8) > 0.5
    fitted, transform = fit(mask.astype(np.float32), (args.size, args.size), order=0)
    back = unfit(fitted, transform, order=0)
    print(
        f"original {transform.original} -> resized {transform.scaled} -> padded {fitted.shape} "
        f"(padding {transform.pad})"
    )
    print(
        f"mask values after fit: {sorted(np.unique(fitted).tolist())} "
        "(nearest neighbour: still binary)"
    )
    print(
        f"back to {back.shape}: {np.mean(back == mask):.2%} of the pixels "
        "equal to the original mask "
        "(100% when the image fits and is only padded)"
    )


if __name__ == "__main__":
    main()
