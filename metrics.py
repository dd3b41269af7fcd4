"""Exercise 2.2: exact Dice and IoU, and the surface distances that say how far off a boundary is.

What this script teaches:
- Dice = 2|A∩B| / (|A|+|B|) and IoU = |A∩B| / |A∪B| on binary masks, with both related by
  Dice = 2·IoU / (1 + IoU): Dice is never below IoU, and they rank predictions identically;
- the empty cases are decided, not smoothed away: both masks empty -> 1.0, exactly one empty -> 0.0.
  A `smooth=1` term in the formula is a bug: on a 2x2 mask it turns a Dice of 0.8 into 0.83;
- a global value (all pixels of all images pooled) differs from a per-image mean (MONAI's
  convention): one missed small lesion barely moves the first and costs a whole image in the second;
- overlap is not shape: the 95th-percentile Hausdorff distance (HD95) and the normalized surface
  Dice (NSD) of the Medical Segmentation Decathlon compare the *boundaries*, in millimetres once the
  voxel spacing is known. A false alarm far from the lesion barely moves Dice and sends HD95 up
  (unless it holds under 5 % of the surface: the percentile is there to ignore stray voxels); a
  boundary one voxel off everywhere costs a small lesion a quarter of its Dice and none of its NSD
  at a 1-voxel tolerance.

The Keras side (epoch metrics, losses) is losses.py.

    python metrics.py        # worked cases (Dice, IoU, HD95, NSD, ASSD), scikit-learn cross-check
"""

import argparse
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from sklearn.metrics import f1_score, jaccard_score

Spacing = float | Sequence[float] | None  # voxel size per spatial axis (one number: isotropic)
NSD_RELATIVE_SLACK = 1e-6  # a distance within tolerance·(1 + slack) is within the tolerance


# ------------------------------------------------------------------------------------------------
# Overlap: exact counts on binarized masks.


def confusion_counts(
    y_true: ArrayLike, y_pred: ArrayLike, threshold: float = 0.5, per_image: bool = False
) -> tuple:
    """(TP, FP, FN) pixel counts of a binary mask against probabilities.

    Args:
        y_true: binary mask of 0s and 1s, any shape.
        y_pred: probabilities (or a 0/1 mask) of the same shape.
        threshold: predictions >= threshold count as foreground.
        per_image: count each image apart (axis 0 is the batch).

    Returns:
        (TP, FP, FN): integers, or arrays over axis 0 if per_image.

    Raises:
        ValueError: shapes differ, y_true is not binary, or per_image without a batch axis.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shape mismatch: y_true {y_true.shape} vs y_pred {y_pred.shape}")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must be a binary mask of 0s and 1s")
    truth, pred = y_true.astype(bool), y_pred >= threshold
    axis = tuple(range(1, truth.ndim)) if per_image else None
    if per_image and truth.ndim < 2:
        raise ValueError("per_image=True needs a batch axis first, e.g. (N, H, W) or (N, H, W, 1)")
    return (
        np.sum(truth & pred, axis=axis),
        np.sum(~truth & pred, axis=axis),
        np.sum(truth & ~pred, axis=axis),
    )


def _ratio(numerator, denominator):
    """numerator / denominator, and 1.0 where the denominator is 0 (both masks empty: a perfect
    answer)."""
    numerator, denominator = np.asarray(numerator, float), np.asarray(denominator, float)
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1), 1.0)


def dice_coefficient(
    y_true: ArrayLike, y_pred: ArrayLike, threshold: float = 0.5, per_image: bool = False
) -> float:
    """Dice = 2TP / (2TP + FP + FN); 1.0 when both masks are empty.

    Args: as `confusion_counts`.

    Returns:
        Dice over all pixels pooled, or the mean of the per-image values if per_image.
    """
    tp, fp, fn = confusion_counts(y_true, y_pred, threshold, per_image)
    return float(np.mean(_ratio(2 * tp, 2 * tp + fp + fn)))


def iou_score(
    y_true: ArrayLike, y_pred: ArrayLike, threshold: float = 0.5, per_image: bool = False
) -> float:
    """IoU (Jaccard) = TP / (TP + FP + FN); 1.0 when both masks are empty.

    Args: as `confusion_counts`.

    Returns:
        IoU over all pixels pooled, or the mean of the per-image values if per_image.
    """
    tp, fp, fn = confusion_counts(y_true, y_pred, threshold, per_image)
    return float(np.mean(_ratio(tp, tp + fp + fn)))


def label_map(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The predicted class of every voxel.

    Args:
        probabilities: (..., 1) sigmoid output (foreground probability) or (..., C) softmax.
        threshold: sigmoid only: foreground where the probability is >= threshold.

    Returns:
        uint8 labels of the spatial shape (the channel axis dropped): 0/1, or 0..C-1 (argmax).
    """
    if probabilities.shape[-1] == 1:
        return (probabilities[..., 0] >= threshold).astype(np.uint8)
    return np.argmax(probabilities, axis=-1).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Surface distances, for one image or volume, as MONAI defines them (surface_distances says how).


def _spatial_rank(shape, spacing, spatial_dims):
    """The number of spatial axes: `spatial_dims`, else the length of a per-axis `spacing`, else
    the array's rank, a trailing 1 taken as a channel only where it cannot be an axis (4D)."""
    if spatial_dims is not None:
        return spatial_dims
    if np.size(spacing) > 1:
        return np.size(spacing)
    if len(shape) == 3 and shape[-1] == 1:
        raise ValueError(
            f"shape {tuple(shape)} is ambiguous: a 2D image with a channel, or a volume of "
            "width 1; pass spatial_dims (2 or 3) or a spacing per axis"
        )
    return 3 if len(shape) == 4 and shape[-1] == 1 else len(shape)


def _binary_pair(y_true, y_pred, threshold, spacing, spatial_dims):
    """(truth, prediction) boolean arrays of one image or volume, the channel axis dropped."""
    truth, pred = np.asarray(y_true), np.asarray(y_pred)
    if truth.shape != pred.shape:
        raise ValueError(f"shape mismatch: y_true {truth.shape} vs y_pred {pred.shape}")
    if not np.isin(truth, (0, 1)).all():
        raise ValueError("y_true must be a binary mask of 0s and 1s")
    rank = _spatial_rank(truth.shape, spacing, spatial_dims)
    if truth.ndim == rank + 1 and truth.shape[-1] == 1:
        truth, pred = truth[..., 0], pred[..., 0]
    if rank not in (2, 3) or truth.ndim != rank:
        raise ValueError(
            f"expected one image (H, W) or volume (D, H, W), optionally with a trailing channel "
            f"axis of 1, in {rank} spatial axes (spatial_dims, else the spacing's length), got "
            f"shape {np.shape(y_true)}"
        )
    return truth.astype(bool), pred >= threshold


def _sampling(spacing, ndim):
    sampling = np.asarray(1.0 if spacing is None else spacing, float).ravel()
    sampling = np.repeat(sampling, ndim) if sampling.size == 1 else sampling
    if sampling.size != ndim or not (np.isfinite(sampling).all() and (sampling > 0).all()):
        raise ValueError(f"spacing must be positive, one number or {ndim}, got {spacing}")
    return sampling


def surface(mask: ArrayLike) -> np.ndarray:
    """The surface voxels of a mask: the mask minus its erosion by the cross (connectivity 1).

    Args:
        mask: boolean or 0/1 array, 2D or 3D. Voxels outside the array count as background.

    Returns:
        Boolean array of the mask's shape.
    """
    mask = np.asarray(mask, bool)
    cross = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, cross, border_value=0)


def surface_distances(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    spacing: Spacing = None,
    threshold: float = 0.5,
    spatial_dims: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each surface voxel of one mask to the nearest surface voxel of the other.

    MONAI's definitions (get_mask_edges and get_surface_distance, under compute_hausdorff_distance
    and compute_surface_dice with use_subvoxels=False):
    - the surface of a mask is the mask minus its binary erosion by the cross-shaped structuring
      element (connectivity 1: `surface`). Outside the array counts as background (SciPy's
      border_value=0; MONAI pads its crop with one voxel of background), so a mask touching the
      border of the image has a surface there;
    - the distance of a surface voxel is the Euclidean distance to the nearest surface voxel of the
      other mask, scaled by the spacing (SciPy's distance_transform_edt(sampling=spacing));
    - `hd95` interpolates percentiles linearly (NumPy's default, torch.quantile's in MONAI).
    Empty masks follow the project's rule for Dice: both empty is a perfect answer (HD95 0, NSD 1,
    where MONAI gives NaN), exactly one empty the worst (HD95 and ASSD inf, NSD 0; `hd95` says
    why, and where MONAI differs).
    The spatial rank comes from `spatial_dims` or the spacing's length, never from a trailing axis
    of 1: a (D, H, 1) volume with a 3-value spacing is 3D (its surface is every voxel), not a 2D
    image with a channel; a (H, W, 1) array with neither is refused as ambiguous.

    Args:
        y_true: binary mask of one image (H, W) or volume (D, H, W), a trailing (…, 1) allowed.
        y_pred: probabilities or a 0/1 mask of the same shape.
        spacing: voxel size per axis (or one number), in the unit the distances come out in;
            None: 1 (voxels). A value per axis also fixes the spatial rank.
        threshold: predictions >= threshold count as foreground.
        spatial_dims: 2 or 3 spatial axes (None: from the spacing's length, else the shape: a
            trailing axis of 1 is a channel only on a 4D array).

    Returns:
        (prediction -> truth, truth -> prediction): 1D float arrays, one distance per surface voxel
        of the first mask (inf where the other mask is empty; empty where the first is).

    Raises:
        ValueError: shapes differ, y_true is not binary, not 2D/3D, an ambiguous (H, W, 1), or a
            bad spacing.
    """
    truth, pred = _binary_pair(y_true, y_pred, threshold, spacing, spatial_dims)
    sampling = _sampling(spacing, truth.ndim)
    edges = {"truth": surface(truth), "pred": surface(pred)}

    def directed(source, target):
        if not edges[target].any():
            return np.full(int(edges[source].sum()), np.inf)
        return ndimage.distance_transform_edt(~edges[target], sampling=sampling)[edges[source]]

    return directed("pred", "truth"), directed("truth", "pred")


def hd95(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    spacing: Spacing = None,
    threshold: float = 0.5,
    spatial_dims: int | None = None,
) -> float:
    """95th-percentile Hausdorff distance: the larger of the two directed 95th percentiles.

    When exactly one mask is empty (a missed lesion, a false alarm on a healthy case) there is no
    boundary to measure, and the project returns inf: the worst value, that no mean can absorb
    unnoticed, so it is counted apart (tp4/training/evaluation.py: `test_one_empty`, and
    `test_hd95` over the cases where both masks have foreground). MONAI returns NaN there (the
    percentile of an empty set of distances, with a warning), which its NaN-skipping mean then
    drops without a word: a model that misses lesions would look better.

    Args: as `surface_distances`.

    Returns:
        In the unit of `spacing`; 0.0 if both masks are empty, inf if exactly one is.
    """
    to_truth, to_pred = surface_distances(y_true, y_pred, spacing, threshold, spatial_dims)
    if to_truth.size == 0 or to_pred.size == 0:  # an empty mask has no surface
        return 0.0 if to_truth.size == to_pred.size else float("inf")
    return float(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)))


def surface_dice(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    tolerance: float,
    spacing: Spacing = None,
    threshold: float = 0.5,
    spatial_dims: int | None = None,
) -> float:
    """Normalized surface Dice (NSD, Nikolov et al. 2021): the fraction of the surface voxels of
    both masks that lie within `tolerance` of the other mask's surface.

    A distance equal to the tolerance counts as within it, also when float rounding puts it a hair
    above (3 voxels of 0.1 mm are 0.30000000000000004 mm): distances are compared to the tolerance
    with a relative slack of 1e-6 (NSD_RELATIVE_SLACK).

    Args:
        tolerance: accepted boundary error, in the unit of `spacing` (>= 0).
        y_true, y_pred, spacing, threshold, spatial_dims: as `surface_distances`.

    Returns:
        In [0, 1]; 1.0 if both masks are empty, 0.0 if exactly one is.
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    to_truth, to_pred = surface_distances(y_true, y_pred, spacing, threshold, spatial_dims)
    total = to_truth.size + to_pred.size
    if total == 0:
        return 1.0
    limit = tolerance * (1 + NSD_RELATIVE_SLACK)
    return float((np.sum(to_truth <= limit) + np.sum(to_pred <= limit)) / total)


def assd(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    spacing: Spacing = None,
    threshold: float = 0.5,
    spatial_dims: int | None = None,
) -> float:
    """Average symmetric surface distance: the mean of the distances of both surfaces.

    Args: as `surface_distances`.

    Returns:
        In the unit of `spacing`; 0.0 if both masks are empty, inf if exactly one is.
    """
    to_truth, to_pred = surface_distances(y_true, y_pred, spacing, threshold, spatial_dims)
    distances = np.concatenate([to_truth, to_pred])
    return float(distances.mean()) if distances.size else 0.0


def main():
    argparse.ArgumentParser(
        prog="metrics.py", description=__doc__.split("\n\n")[0], epilog="It takes no options."
    ).parse_args()
    print(__doc__.split("\n\n")[0], "\n")
    square = np.zeros((64, 64), dtype=np.uint8)
    square[16:48, 16:48] = 1
    half = np.zeros_like(square)
    half[16:48, 16:32] = 1
    small = np.zeros_like(square)
    small[30:34, 30:34] = 1
    far_alarm = square.copy()
    far_alarm[2:8, 2:8] = 1
    empty = np.zeros_like(square)
    cases = {
        "perfect prediction": (square, square),
        "shifted by 1 pixel": (square, np.roll(square, 1, axis=1)),
        "small lesion, 1 pixel off": (small, np.roll(small, 1, axis=1)),
        "shifted by 4 pixels": (square, np.roll(square, 4, axis=1)),
        "shifted by 16 pixels": (square, np.roll(square, 16, axis=1)),
        "half the lesion found": (square, half),
        "twice too large": (half, square),
        "far false alarm (6x6)": (square, far_alarm),
        "missed completely": (square, empty),
        "false alarm on empty": (empty, square),
        "both empty": (empty, empty),
    }
    print(
        f"{'case':<26}{'Dice':>8}{'IoU':>8}{'2·IoU/(1+IoU)':>15}{'HD95':>8}{'NSD@1':>8}{'ASSD':>8}"
    )
    for label, (truth, pred) in cases.items():
        dice, iou = dice_coefficient(truth, pred), iou_score(truth, pred)
        print(
            f"{label:<26}{dice:>8.4f}{iou:>8.4f}{2 * iou / (1 + iou):>15.4f}"
            f"{hd95(truth, pred):>8.2f}{surface_dice(truth, pred, 1.0):>8.4f}"
            f"{assd(truth, pred):>8.2f}"
        )
    print("(HD95 and ASSD in pixels; NSD@1: surface Dice at a tolerance of 1 pixel)")

    rng = np.random.default_rng(0)
    truth = (rng.random((200, 32, 32)) < rng.uniform(0.02, 0.5, (200, 1, 1))).astype(np.uint8)
    probabilities = np.clip(truth + rng.normal(0, 0.45, truth.shape), 0, 1)
    dice, iou = dice_coefficient(truth, probabilities), iou_score(truth, probabilities)
    flat_true, flat_pred = truth.ravel(), (probabilities >= 0.5).ravel()
    print("\n200 random 32x32 masks with noisy predictions:")
    print(f"  Dice {dice:.6f}   scikit-learn f1_score      {f1_score(flat_true, flat_pred):.6f}")
    print(
        f"  IoU  {iou:.6f}   scikit-learn jaccard_score {jaccard_score(flat_true, flat_pred):.6f}"
    )
    print(f"  identity: |Dice - 2·IoU/(1+IoU)| = {abs(dice - 2 * iou / (1 + iou)):.2e}")
    print(
        f"  per-image mean Dice {dice_coefficient(truth, probabilities, per_image=True):.6f} "
        f"(global {dice:.6f}: small masks weigh more per image)"
    )


if __name__ == "__main__":
    main()
