"""A dataset's fingerprint, as nnU-Net measures it before planning anything.

What this module teaches: what a plan needs to know about the data, measured on every training
case: the voxel spacings and shapes (the target spacing and the patch come from them), the
intensities inside the foreground (CT is normalized with them), and the share of each class.
"""

import numpy as np

from tp4.images import datasets, volumes

SAMPLES_PER_CASE = 10_000  # foreground intensities kept per case (nnU-Net samples alike)


def measure(folder: str, seed: int = 0) -> dict:
    """The fingerprint of an imagesTr/labelsTr folder (NIfTI, NRRD, MetaImage, DICOM series).

    Args:
        folder: the dataset (datasets.find_pairs' layouts with volumes).
        seed: of the foreground sample.

    Returns:
        {"cases", "spacings" (N, 3) mm, "shapes" (N, 3), "foreground_percentiles" (0.5, 50, 99.5
        and mean, std of the sampled foreground intensities), "class_shares" (of all voxels, by
        label)}, lists for JSON.

    Raises:
        DataError: a folder or file that cannot be read (one line naming it).
    """
    _, pairs = datasets.find_pairs(folder)
    read = ((volumes.read(i), volumes.read(m)) for i, m in pairs)
    return measure_cases(((i.array, m.array, i.spacing) for i, m in read), seed)


def measure_cases(cases, seed: int = 0) -> dict:
    """The fingerprint of (image, label map, spacing) cases: `measure`'s, from arrays.

    Args:
        cases: an iterable of (X, Y, Z) image, its (X, Y, Z) label map and its voxel size (mm).
        seed: of the foreground sample.

    Returns:
        `measure`'s dict.
    """
    rng = np.random.default_rng(seed)
    spacings, shapes, samples, counts = [], [], [], {}
    for image, label, spacing in cases:
        spacings.append([float(s) for s in spacing])
        shapes.append(list(image.shape))
        labels = np.rint(label).astype(np.int64)
        foreground = image[labels > 0]
        if foreground.size:
            take = min(SAMPLES_PER_CASE, foreground.size)
            samples.append(rng.choice(foreground.ravel(), take, replace=False))
        for value, count in zip(*np.unique(labels, return_counts=True)):
            counts[int(value)] = counts.get(int(value), 0) + int(count)
    pooled = np.concatenate(samples) if samples else np.zeros(1)
    total = sum(counts.values())
    return {
        "cases": len(shapes),
        "spacings": spacings,
        "shapes": shapes,
        "foreground_percentiles": {
            "p0.5": float(np.percentile(pooled, 0.5)),
            "p50": float(np.percentile(pooled, 50)),
            "p99.5": float(np.percentile(pooled, 99.5)),
            "mean": float(pooled.mean()),
            "std": float(pooled.std()),
        },
        "class_shares": {str(c): n / total for c, n in sorted(counts.items())},
    }
