"""nnU-Net's plan from a fingerprint: target spacing, patch and batch, depth, normalization.

What this module teaches, the rules nnU-Net (Isensee et al. 2021) applies, in small:
- target spacing: the median spacing of the cases on each axis; on a very anisotropic axis (more
  than ANISOTROPY times the finest), the 10th percentile instead, no finer than the other axes, so
  that the coarse axis is not interpolated into slices that were never scanned;
- patch: the median shape at that spacing, rounded up to what the pools divide (datasets.py tiles
  whole cases, padded to the patch: nnU-Net crops at random, and rounds down), cut down (the
  largest axis first) until one training
  step's activations (tp4/perf/memory.py counts them on the real network) fit MEMORY_BUDGET with a
  batch of 2; then the batch grows while they still fit;
- depth: pools until the bottleneck is 4 to 8 voxels along the smallest patch axis;
- the 2D configuration (train.py, a volume's axial slices) plans in-plane only: the first two axes'
  target spacing (the slices keep theirs), a square patch (the project's 2D U-Net is square) of
  the larger median in-plane side, counted on the 2D U-Net;
- normalization by modality: CT clipped to the foreground's 0.5-99.5 percentiles, then z-scored
  with the foreground's mean and std (the dataset's); anything else: z-score per image.
"""

import numpy as np

import unet
from tp4.perf import memory

ANISOTROPY = 3.0  # nnU-Net's threshold of the spacing ratio
MEMORY_BUDGET = 2 * 2**30  # bytes of activations per step: a laptop's share
BOTTLENECK = 4  # voxels, at least, along each axis of the deepest level
MIN_BATCH, MAX_BATCH = 2, 16


def target_spacing(spacings: np.ndarray) -> list[float]:
    """The median spacing per axis; the 10th percentile on a very anisotropic coarse axis."""
    spacings = np.asarray(spacings, float)
    target = np.median(spacings, axis=0)
    coarse = int(np.argmax(target))
    others = np.delete(target, coarse)
    if target[coarse] > ANISOTROPY * others.min():
        target[coarse] = max(np.percentile(spacings[:, coarse], 10), others.max())
    return [float(t) for t in target]


def depth_for(patch) -> int:
    """Levels (bottleneck included) so that the smallest axis ends at 4 to 8 voxels, fewer where
    an axis is not divisible by every pool (a patch the user chose)."""
    depth = max(1, int(np.floor(np.log2(min(patch) / BOTTLENECK))) + 1)
    while depth > 1 and any(int(s) % 2 ** (depth - 1) for s in patch):
        depth -= 1
    return depth


def _round_up(size, multiple):
    return -(-int(size) // multiple) * multiple


def step_bytes(patch, base_filters, batch) -> int:
    """Activation bytes of one training step of the planned U-Net (float32), 2D or 3D by the
    patch's length."""
    build = unet.build_unet3d if len(patch) == 3 else unet.build_unet
    model = build((*patch, 1), base_filters, depth_for(patch))
    return memory.activation_bytes(model, batch)


def patch_and_batch(median_shape, base_filters=8, budget=MEMORY_BUDGET):
    """(patch, batch): the median shape cut to the memory budget (largest axis first)."""
    patch = [int(s) for s in median_shape]
    while True:
        multiple = 2 ** max(0, int(np.floor(np.log2(min(patch) / BOTTLENECK))))
        patch = [_round_up(s, multiple) for s in patch]
        if step_bytes(patch, base_filters, MIN_BATCH) <= budget or max(patch) <= 2 * BOTTLENECK:
            break
        if len(patch) == 2:  # the square 2D patch: both sides
            patch = [int(side * 0.75) for side in patch]
        else:
            largest = int(np.argmax(patch))
            patch[largest] = int(patch[largest] * 0.75)
    return patch, batch_for(patch, base_filters, budget)


def batch_for(patch, base_filters=8, budget=MEMORY_BUDGET) -> int:
    """The largest batch (MIN_BATCH to MAX_BATCH) whose step's activations fit the budget."""
    batch = MIN_BATCH
    per_example = step_bytes(patch, base_filters, 1)
    while batch < MAX_BATCH and per_example * (batch + 1) <= budget:
        batch += 1
    return batch


def make(
    fingerprint: dict,
    modality: str = "other",
    base_filters: int = 8,
    budget=MEMORY_BUDGET,
    dims: int = 3,
) -> dict:
    """The plan of a fingerprint (fingerprint.measure's): a dict, for plan.json and params.

    Args:
        fingerprint: the dataset's measures.
        modality: "CT" (fixed intensity scale: dataset-wide clip and z-score) or anything else.
        base_filters: the U-Net's first level (the memory count depends on it).
        budget: activation bytes per step.
        dims: 3 (volumes: patches (X, Y, Z)) or 2 (axial slices: a square in-plane patch).

    Returns:
        target_spacing (mm, one per planned axis: X, Y[, Z]), median_shape, patch, batch_size,
        depth, normalization, resampling and what they were counted with.
    """
    spacings = np.asarray(fingerprint["spacings"], float)
    shapes = np.asarray(fingerprint["shapes"], float)
    target = target_spacing(spacings)[:dims]
    median_shape = np.median(shapes[:, :dims] * spacings[:, :dims] / np.asarray(target), axis=0)
    wanted = np.round(median_shape) if dims == 3 else [np.round(median_shape.max())] * 2
    patch, batch = patch_and_batch(wanted, base_filters, budget)
    stats = fingerprint["foreground_percentiles"]
    if modality.upper() == "CT":
        normalization = {
            "scheme": "CT",
            "clip": [stats["p0.5"], stats["p99.5"]],
            "mean": stats["mean"],
            "std": stats["std"],
        }
    else:
        normalization = {"scheme": "z-score per image"}
    return {
        "target_spacing": target,
        "median_shape": [int(s) for s in np.round(median_shape)],
        "patch": patch,
        "batch_size": batch,
        "depth": depth_for(patch),
        "base_filters": base_filters,
        "step_activation_mib": round(step_bytes(patch, base_filters, batch) / 2**20, 1),
        "normalization": normalization,
        "dims": dims,
        "resampling": {
            "images": "third order (spline)",
            "labels": "linear on one-hot, then the most probable class",
            "probabilities back": "linear",
        },
    }
