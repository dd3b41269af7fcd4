"""Data for the TP: synthetic scans that look medical, a reproducible split, and tf.data pipelines.

What this script teaches:
- how to fake a segmentation dataset that is hard in the right ways: a body with texture, lesions of
  varied shape and size (the class to segment), look-alike tubular structures that are *not*
  lesions, blur (partial-volume effect), a smooth intensity bias field and Rician noise, as in MRI;
- why the foreground fraction matters: `foreground=0.015` gives the 1-2 % lesions of real studies,
  where a network that predicts "background everywhere" is 98.5 % accurate and 0 % useful;
- several classes: with `num_classes=C`, C-1 kinds of lesion, each with its own shape (kind 2 more
  elongated than kind 1) and contrast (kind 2 darker than the tissue, kind 3 fainter and bright
  again, as MRI shows hyper- and hypo-intense lesions), and masks that are label maps 0..C-1;
- a tf.data input pipeline that keeps the CPU busy with the network, not with the data:
  shuffle -> joint image+mask augmentation -> batch -> prefetch.

The same generator makes 2D images (N, H, W, 1) and 3D volumes (N, D, H, W, 1): every step below
works in any number of dimensions. Real data (`--data-dir` folders of PNG or NIfTI files, the
built-in `mni-wm`) is loaded by datasets.py, which train.py and conv3d.py import too: it reuses
normalize_intensity, split, describe and content_hash from here.

    python data.py                       # describe a default synthetic dataset and its split
    python data.py --foreground 0.015    # the class-imbalanced variant
    python data.py --save outputs/sample.png   # look at a few images with their masks
"""

# First, before anything loads TensorFlow: its start-up notices filtered out by the project's
# tp4/startup.py where the checkout has it; copied on its own, this module runs without it.
import contextlib

with contextlib.suppress(ImportError):
    from tp4 import startup  # noqa: F401

# isort: split
import argparse
import hashlib
import os
from typing import Literal, NamedTuple

import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure
from scipy import ndimage
from sklearn.model_selection import train_test_split

# Defaults of the synthetic scans, in one visible place.
FOREGROUND = 0.05  # mean fraction of pixels that are lesion
LESIONS = (1, 3)  # min and max number of lesions per scan
CONTRAST = 0.35  # lesion brightness above the surrounding tissue (images are about 0..1)
NOISE = 0.04  # standard deviation of the Rician noise
BLUR = 1.0  # Gaussian blur sigma in pixels (partial-volume effect)
BIAS = 0.3  # peak-to-peak amplitude of the multiplicative bias field
DISTRACTORS = 2  # tubular look-alikes (vessels) that must not be segmented
NUM_CLASSES = 2  # background and one kind of lesion: a binary mask
ELONGATION = 1.8  # lesion kind k is ELONGATION**(k-1) times longer along one axis than kind 1
CONTRAST_RATIO = -0.7  # the contrast of lesion kind k is CONTRAST_RATIO**(k-1) times kind 1's


class Cases(NamedTuple):
    """Who the examples are, for per-case results: a name and a voxel size for each example."""

    ids: list  # one name per example: a file, a case and its slice or patch
    spacing: np.ndarray  # (N, spatial dims): each example's voxel size, after any resize


def _smooth_noise(rng, shape, sigma):
    """Gaussian-filtered white noise, rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-12)


def _blob(rng, grid, center, radii, irregularity):
    """Boolean mask of an ellipsoid whose surface is pushed in and out by smooth noise."""
    distance = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)))
    wobble = _smooth_noise(rng, distance.shape, sigma=max(2.0, min(radii) / 2))
    return distance <= 1.0 + irregularity * wobble


def _synthetic_scan(
    rng, shape, foreground, lesions, contrast, noise, blur, bias, distractors, num_classes
):
    """One image and its label map (0: background, 1..num_classes-1: kinds of lesion), for a 2D
    (H, W) or 3D (D, H, W) shape. With two classes, no random draw is added to the sequence: the
    scans are those of the binary generator."""
    ndim = len(shape)
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    size = np.array(shape, dtype=np.float32)

    # Body: a large irregular ellipsoid of textured tissue on a dark background.
    body = _blob(
        rng,
        grid,
        size / 2 * rng.uniform(0.95, 1.05, ndim),
        size * rng.uniform(0.36, 0.45, ndim),
        0.05,
    )
    image = 0.05 + body * (0.45 + 0.06 * _smooth_noise(rng, shape, sigma=2.0))

    # Vessels: elongated look-alikes, half as bright as lesions, that are not part of the mask.
    for _ in range(distractors):
        radii = np.full(ndim, min(shape) * 0.02)
        radii[rng.integers(ndim)] = min(shape) * 0.2
        center = size / 2 + (rng.uniform(-0.2, 0.2, ndim) * size)
        image += 0.5 * contrast * (_blob(rng, grid, center, radii, 0.1) & body)

    # Lesions: their total volume is drawn around `foreground` of the scan, shared at random between
    # them. Each is one kind (class); a later lesion covers an earlier one where they overlap.
    labels = np.zeros(shape, dtype=np.uint8)
    count = rng.integers(lesions[0], lesions[1] + 1)
    total = foreground * np.prod(shape) * rng.uniform(0.5, 1.5)
    kinds = rng.integers(1, num_classes, count) if num_classes > 2 else np.ones(count, int)
    unit_ball = np.pi if ndim == 2 else 4 / 3 * np.pi
    for volume, kind in zip(total * rng.dirichlet(np.ones(count)), kinds):
        aspect = rng.uniform(0.75, 1.33, ndim)
        aspect[0] *= ELONGATION ** (kind - 1)
        radii = (volume / unit_ball) ** (1 / ndim) * aspect / np.prod(aspect) ** (1 / ndim)
        center = size / 2 + rng.uniform(-0.22, 0.22, ndim) * size
        labels[_blob(rng, grid, center, np.maximum(radii, 1.0), 0.15) & body] = kind
    ratios = np.concatenate([[0.0], CONTRAST_RATIO ** np.arange(num_classes - 1)])
    image += contrast * ratios[labels] * (1 + 0.1 * _smooth_noise(rng, shape, sigma=1.5))

    # Acquisition: blur, a smooth multiplicative bias field, then Rician (MRI magnitude) noise.
    image = ndimage.gaussian_filter(image, blur) if blur > 0 else image
    ramp = sum(rng.uniform(-1, 1) * (g / s - 0.5) for g, s in zip(grid, size))
    image = image * (1 + bias * ramp / ndim)
    real, imag = image + noise * rng.standard_normal(shape), noise * rng.standard_normal(shape)
    return normalize_intensity(np.sqrt(real**2 + imag**2)), labels


def normalize_intensity(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Map the [low, high] percentiles of an image to [0, 1], clip: robust to outliers, scanners.

    Args:
        image: any array of intensities.
        low, high: the percentiles that become 0 and 1.

    Returns:
        float32 array of the image's shape, in [0, 1].
    """
    lo, hi = np.percentile(image, [low, high])
    return np.clip((image - lo) / max(hi - lo, 1e-8), 0.0, 1.0).astype(np.float32)


def make_synthetic(
    n: int,
    shape: tuple[int, ...],
    seed: int = 0,
    foreground: float = FOREGROUND,
    lesions: tuple[int, int] = LESIONS,
    contrast: float = CONTRAST,
    noise: float = NOISE,
    blur: float = BLUR,
    bias: float = BIAS,
    distractors: int = DISTRACTORS,
    num_classes: int = NUM_CLASSES,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic scans with lesions to segment, 2D or 3D from the length of `shape`.

    Args:
        n: number of scans.
        shape: (H, W) of 2D scans or (D, H, W) of volumes, in pixels or voxels.
        seed: the random seed (same seed, same scans).
        foreground: mean fraction of the pixels that are lesion, in (0, 0.5).
        lesions: (min, max) number of lesions per scan.
        contrast: lesion brightness above the tissue (kind 1).
        noise: standard deviation of the Rician noise.
        blur: Gaussian blur sigma in pixels (partial-volume effect).
        bias: peak-to-peak amplitude of the multiplicative bias field.
        distractors: tubular look-alikes that are not lesions.
        num_classes: classes, background included: 2 gives binary masks, C gives C-1 kinds of
            lesion.

    Returns:
        (images, masks), both float32 (N, *shape, 1): images in [0, 1], masks of values
        0..num_classes-1.

    Raises:
        ValueError: n < 1, foreground out of range, or num_classes < 2.
    """
    if n < 1:
        raise ValueError(f"need at least one scan, got n={n}")
    if not 0 < foreground < 0.5:
        raise ValueError(f"foreground must be in (0, 0.5), got {foreground}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background: 2 or more, not {num_classes}")
    rng = np.random.default_rng(seed)
    options = dict(lesions=lesions, contrast=contrast, noise=noise, blur=blur, bias=bias)
    options.update(distractors=distractors, num_classes=num_classes)
    scans = [_synthetic_scan(rng, tuple(shape), foreground, **options) for _ in range(n)]
    images = np.stack([image for image, _ in scans])[..., None]
    masks = np.stack([mask for _, mask in scans])[..., None].astype(np.float32)
    return images, masks


def make_synthetic_2d(n: int, size: int = 128, seed: int = 0, **options) -> tuple:
    """`n` synthetic 2D scans of size x size pixels: `make_synthetic` (same options)."""
    return make_synthetic(n, (size, size), seed, **options)


def make_synthetic_3d(n: int, shape=(32, 64, 64), seed: int = 0, **options) -> tuple:
    """`n` synthetic volumes of (D, H, W) `shape`: `make_synthetic` (same options)."""
    return make_synthetic(n, tuple(shape), seed, **options)


def split(
    images: np.ndarray,
    masks: np.ndarray,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Deterministic train/validation/test split (scikit-learn's train_test_split).

    Args:
        images, masks: arrays with the examples along axis 0.
        seed: the split's seed (same seed, same split).
        val_fraction, test_fraction: shares of the examples (at least one each).

    Returns:
        {"train": (images, masks), "val": (...), "test": (...)}.

    Raises:
        ValueError: different lengths, or too few examples for three parts.
    """
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    n_test = max(1, round(test_fraction * len(images)))
    n_val = max(1, round(val_fraction * len(images)))
    if len(images) - n_test - n_val < 1:
        raise ValueError(f"{len(images)} images are too few for a train/validation/test split")
    index = np.arange(len(images))
    rest, test = train_test_split(index, test_size=n_test, random_state=seed)
    train, val = train_test_split(rest, test_size=n_val, random_state=seed)
    return {
        name: (images[i], masks[i]) for name, i in (("train", train), ("val", val), ("test", test))
    }


def require_foreground(splits: dict, source: str) -> None:
    """Refuse a training set without foreground: the network would learn to answer "background"
    everywhere and the run would end at Dice 0 without a word.

    Args:
        splits: the result of `split` (or datasets.load_split).
        source: the data's name, for the message.

    Raises:
        ValueError: if no training mask holds a foreground pixel.
    """
    masks = splits["train"][1]
    if not masks.any():
        raise ValueError(
            f"no foreground in the {len(masks)} training examples of {source}: every mask is "
            "empty, nothing to learn (foreground is a mask value > 0)"
        )


def describe(
    images: np.ndarray, masks: np.ndarray, source: str, splits: dict | None = None
) -> dict[str, object]:
    """What the data is, as flat MLflow params (the scripts print them too).

    Args:
        images, masks: the whole dataset, examples along axis 0.
        source: where it came from ("synthetic-2d", a folder...).
        splits: the result of `split`, to record its sizes.

    Returns:
        data_source, data_count, data_shape, data_foreground_fraction (all lesion classes),
        data_spacing (1 pixel: synthetic data), data_hash, and data_split if splits are given.
    """
    description = {
        "data_source": source,
        "data_count": len(images),
        "data_shape": "x".join(str(s) for s in images.shape[1:]),
        "data_foreground_fraction": round(float(np.mean(masks > 0)), 4),
        "data_spacing": spacing_text(np.ones((1, images.ndim - 2)), "px"),
        "data_hash": content_hash(images, masks),
    }
    if splits:
        description["data_split"] = "/".join(
            str(len(splits[k][0])) for k in ("train", "val", "test")
        )
    return description


def spacing_text(spacing: np.ndarray, unit: Literal["mm", "px"]) -> str:
    """The voxel sizes of a dataset in a few words, for the `data_spacing` param.

    Args:
        spacing: (N, spatial dims) voxel size of each example.
        unit: "mm" or "px".

    Returns:
        "1x1 px", "0.8x0.8x2.5 mm", or "12 spacings, 0.7x0.7 to 1.2x1.2 mm" (smallest to largest
        voxel).
    """
    rows = sorted({tuple(row) for row in np.asarray(spacing, float)}, key=np.prod)
    shown = list(dict.fromkeys("x".join(f"{s:.3g}" for s in row) for row in rows))
    if len(shown) <= 3:
        return f"{', '.join(shown)} {unit}"
    return f"{len(shown)} spacings, {shown[0]} to {shown[-1]} {unit}"


def content_hash(*arrays: np.ndarray) -> str:
    """A short fingerprint of the data: same hash, same data.

    Args:
        arrays: the arrays, in order (their bytes, C-contiguous).

    Returns:
        The first 12 hex digits of a SHA-256 over their bytes.
    """
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:12]


def _augment(image, mask, seed):
    """The same random flip and 90-degree rotation for image and mask, in-plane, one draw per image
    or volume (tf.image's random flip would take a volume for a batch and flip each slice its own
    way, scrambling the depth axis that Conv3D learns from)."""
    both = tf.concat([image, mask], axis=-1)
    flip = tf.random.stateless_uniform([], seed=seed) < 0.5  # the draw of tf.image's flip for 2D
    both = tf.cond(flip, lambda: tf.reverse(both, axis=[-2]), lambda: both)
    if both.shape[-3] == both.shape[-2]:  # rotations keep the shape only for square images
        k = tf.random.stateless_uniform([], seed=seed[::-1], maxval=4, dtype=tf.int32)
        both = tf.image.rot90(both, k)  # one k: every slice of a volume turned alike
    channels = image.shape[-1]
    return both[..., :channels], both[..., channels:]


def make_dataset(
    images: np.ndarray,
    masks: np.ndarray,
    batch_size: int,
    training: bool = False,
    augment: bool = True,
    seed: int = 0,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """tf.data pipeline: shuffle -> joint augmentation -> batch -> prefetch.

    Fixed parallelism instead of tf.data's autotuner: flipping a batch takes milliseconds, and the
    autotuner's background thread could block the replacement of an epoch's iterator for seconds on
    2 busy cores (PERFORMANCE.md).

    Args:
        images, masks: (N, ..., C) arrays; masks are label maps, flipped and rotated with images.
        batch_size: examples per batch.
        training: reshuffle every epoch and augment (deterministic for the seed).
        augment: the random flips and 90-degree rotations, when training.
        seed: the seed of the shuffle and of the augmentation.
        drop_remainder: full batches only (one batch shape, hence one XLA compile;
            recipe.epoch_size).

    Returns:
        A dataset of (images, masks) batches.
    """
    dataset = tf.data.Dataset.from_tensor_slices((images, masks))
    if training:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        if augment:
            # One pair of stateless seeds per example: reproducible, and different at every epoch.
            seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
            dataset = tf.data.Dataset.zip(dataset, seeds).map(
                lambda pair, s: _augment(*pair, s), num_parallel_calls=2
            )
    options = tf.data.Options()
    options.autotune.enabled = False
    # Under a multi-worker strategy each worker takes its share of every batch (distribute.py):
    # arrays have no files to share out.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.batch(batch_size, drop_remainder).prefetch(2).with_options(options)


def samples_figure(images, masks, foreground) -> Figure:
    """The first four scans with their lesion contours (--save)."""
    fig = Figure(figsize=(12, 3.4))
    for ax, image, mask in zip(
        fig.subplots(1, min(4, len(images)), squeeze=False)[0], images, masks
    ):
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
        ax.contour(mask[..., 0], levels=[0.5], colors="lime", linewidths=1)
        ax.set_axis_off()
    fig.suptitle(f"synthetic scans, lesion contours in green (foreground {foreground:.1%})")
    return fig


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--n-images", type=int, default=200, help="number of synthetic scans (3 at least)"
    )
    parser.add_argument(
        "--image-size", type=int, default=128, help="height and width in pixels (8 at least)"
    )
    parser.add_argument(
        "--foreground", type=float, default=FOREGROUND, help="mean lesion fraction of the pixels"
    )
    parser.add_argument(
        "--seed", type=int, default=42, help="random seed (train.py's: the main job's data)"
    )
    parser.add_argument(
        "--save",
        metavar="PNG",
        help="save a figure of a few images with their mask contours (folders made as needed; "
        "outputs/ is ignored by git)",
    )
    args = parser.parse_args()
    if args.n_images < 3 or args.image_size < 8:
        parser.error("--n-images takes 3 at least, --image-size 8 at least")
    try:
        images, masks = make_synthetic_2d(
            args.n_images, args.image_size, args.seed, foreground=args.foreground
        )
        splits = split(images, masks, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    for key, value in describe(images, masks, "synthetic-2d", splits).items():
        print(f"{key:>26}: {value}")
    per_image = masks.mean(axis=(1, 2, 3))
    print(
        f"{'per-image foreground':>26}: min {per_image.min():.4f}  "
        f"median {np.median(per_image):.4f}  "
        f"max {per_image.max():.4f}"
    )
    if args.save:
        os.makedirs(os.path.dirname(os.path.abspath(args.save)), exist_ok=True)
        figure = samples_figure(images, masks, args.foreground)
        figure.savefig(args.save, dpi=100, bbox_inches="tight")
        print(f"saved {args.save}")


if __name__ == "__main__":
    main()
