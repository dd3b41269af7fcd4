"""Exercise 3: volumetric segmentation with Conv3D, its memory cost, and sliding-window inference.

What this script teaches:
- a Conv3D kernel also slides along depth: k³ weights per input/output channel pair instead of k² (27 vs 9
  for k=3), so it sees the structure across slices that a 2D network, slice by slice, cannot;
- the price is memory: every activation has a depth axis too. The levers the TP names (kernel 3x3x3 vs
  2x2x2, fewer filters, fewer slices, mixed precision) are measured here, not asserted;
- a volume larger than the training patch is segmented by overlapping patches whose outputs are blended
  (constant or Gaussian weights), as in MONAI and nnU-Net;
- training is tracked in MLflow exactly like train.py (tracking.py): experiment `tp4-conv3d`.

The 3D U-Net is unet.py's builder given a (D, H, W, C) shape: the same blocks with Conv3D layers
(Çiçek et al. 2016; V-Net, Milletari et al. 2016, is the same idea with residual blocks).

    python conv3d.py                        # summary, Conv2D vs Conv3D, memory levers, then a tracked training
    python conv3d.py --mixed-precision      # the same training under mixed_bfloat16 (CPU) / mixed_float16 (GPU)
    python conv3d.py --skip-training        # only the architecture and the memory tables
    python conv3d.py --dataset mni-wm       # white matter in 3D patches of a real T1 MRI (nilearn's MNI152)
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import data
import datasets
import geometry
import memory
import metrics
import unet

DEFAULT_SHAPE = (32, 64, 64)  # (D, H, W) of the synthetic volumes and of the training patch


def build_unet3d(input_shape=(*DEFAULT_SHAPE, 1), base_filters=8, depth=3, kernel_size=3, output_bias=0.0,
                 name="Conv3D") -> keras.Model:
    """Small 3D U-Net: Conv3D blocks (Conv3D -> BatchNorm -> ReLU, twice), 2x2x2 pooling, transposed Conv3D."""
    if len(input_shape) != 4:
        raise ValueError(f"a volume input must be (D, H, W, C), got {tuple(input_shape)}")
    return unet.build_unet(tuple(input_shape), base_filters, depth, kernel_size=kernel_size,
                           output_bias=output_bias, name=name)


# ---------------------------------------------------------------------------------------------------------------
# Memory levers: activation bytes counted from the layers, peak process memory measured (memory.py).

def measure_levers(shape=DEFAULT_SHAPE, filters=8, depth=3, batch=2, peak_memory=True):
    """One row per lever: parameters, activation bytes, and (in a subprocess each) peak RSS and step time."""
    baseline = dict(shape=list(shape), filters=filters, depth=depth, kernel=3, batch=batch, policy="float32")
    fast_policy = "mixed_float16" if memory.has_gpu() else "mixed_bfloat16"
    variants = {
        "baseline (k=3, all filters, all slices, fp32)": {},
        "kernel 2x2x2": dict(kernel=2),
        "half the filters": dict(filters=max(1, filters // 2)),
        "half the slices (D/2)": dict(shape=[shape[0] // 2, *shape[1:]]),
        f"mixed precision ({fast_policy})": dict(policy=fast_policy),
    }
    rows = []
    for label, change in variants.items():
        spec = {**baseline, **change}
        keras.mixed_precision.set_global_policy(spec["policy"])
        try:
            model = build_unet3d((*spec["shape"], 1), spec["filters"], spec["depth"], spec["kernel"])
        except ValueError:
            continue  # a lever the configuration cannot take, e.g. D/2 no longer divisible by the pooling
        finally:
            keras.mixed_precision.set_global_policy("float32")
        activation_mb = memory.activation_bytes(model, batch) / 2**20
        row = {"lever": label, "params": model.count_params(), "activation_mb": activation_mb}
        if peak_memory:
            row.update(memory.measure_in_subprocess(spec))
        rows.append(row)
    return rows


def conv2d_vs_conv3d(c_in=16, c_out=32, size=64, depth_slices=32, kernel=3):
    """Parameters and output activations of one Conv2D and one Conv3D layer, from real Keras layers."""
    layer2d = keras.layers.Conv2D(c_out, kernel, padding="same")
    layer3d = keras.layers.Conv3D(c_out, kernel, padding="same")
    layer2d.build((None, size, size, c_in))
    layer3d.build((None, depth_slices, size, size, c_in))
    return {
        "weights per kernel and channel pair": (kernel**2, kernel**3),
        f"parameters of one layer {c_in}->{c_out}": (layer2d.count_params(), layer3d.count_params()),
        f"output activations (one {size}x{size} slice / {depth_slices} slices), MB":
            (size * size * c_out * 4 / 2**20, depth_slices * size * size * c_out * 4 / 2**20),
    }


# ---------------------------------------------------------------------------------------------------------------
# Sliding-window inference.

def patch_weights(patch_shape, weighting="gaussian", sigma_scale=0.125):
    """Blending weights of one patch: constant, or a Gaussian (sigma = patch/8, as nnU-Net) that trusts the
    patch centre, where the network saw the most context, more than its borders."""
    if weighting == "constant":
        return np.ones(patch_shape, np.float32)
    if weighting != "gaussian":
        raise ValueError(f"weighting must be 'constant' or 'gaussian', got {weighting!r}")
    axes = [np.exp(-0.5 * ((np.arange(s) - (s - 1) / 2) / (s * sigma_scale)) ** 2) for s in patch_shape]
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(weights / weights.max(), 1e-3).astype(np.float32)  # never 0: every voxel gets a vote


def sliding_window_predict(model, volume, overlap=0.5, weighting="gaussian", batch_size=4):
    """Segment a (D, H, W, C) volume at least as large as the model's patch with overlapping patches whose
    outputs are blended with `patch_weights`. Returns (D, H, W, classes) probabilities."""
    patch = tuple(model.input_shape[1:4])
    if volume.ndim != 4 or volume.shape[-1] != model.input_shape[-1]:
        raise ValueError(f"expected a (D, H, W, {model.input_shape[-1]}) volume, got shape {volume.shape}")
    if any(v < p for v, p in zip(volume.shape, patch)):
        raise ValueError(f"volume {volume.shape[:3]} is smaller than the model's patch {patch}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    strides = [max(1, round(p * (1 - overlap))) for p in patch]
    corners = geometry.window_corners(volume.shape[:3], patch, strides)
    weights = patch_weights(patch, weighting)[..., None]
    total = np.zeros((*volume.shape[:3], model.output_shape[-1]), np.float32)
    norm = np.zeros((*volume.shape[:3], 1), np.float32)
    for first in range(0, len(corners), batch_size):
        chunk = corners[first:first + batch_size]
        windows = [tuple(slice(c, c + p) for c, p in zip(corner, patch)) for corner in chunk]
        predictions = keras.ops.convert_to_numpy(model(np.stack([volume[w] for w in windows]), training=False))
        for window, prediction in zip(windows, predictions):
            total[window] += weights * prediction
            norm[window] += weights
    return total / norm


# ---------------------------------------------------------------------------------------------------------------
# Tracked training on synthetic volumes.

def orthogonal_slices_figure(volumes, masks, probabilities):
    """Axial, coronal and sagittal slices through the centre of the first test volume."""
    import tracking

    volume, mask, probability = volumes[0][..., 0], masks[0][..., 0], probabilities[0][..., 0]
    centre = [int(np.argmax(mask.sum(axis=tuple(a for a in range(3) if a != axis)))) for axis in range(3)]
    fig, axes = tracking.plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, axis, label in zip(axes, range(3), ("axial", "coronal", "sagittal")):
        take = lambda array: np.take(array, centre[axis], axis=axis)  # noqa: E731
        tracking.contour_panel(ax, take(volume), take(mask), take(probability), f"{label} slice {centre[axis]}")
    dice = metrics.dice_coefficient(mask, probability)
    fig.suptitle(f"test volume: ground truth (green), prediction (red), 3D Dice {dice:.3f}")
    return fig


def parse_args(argv=None):
    import train

    parser = argparse.ArgumentParser(prog="conv3d.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    datasets.add_arguments(parser)
    add("--n-volumes", type=int, default=40, help="synthetic volumes (train/val/test 70/15/15)")
    add("--shape", type=int, nargs=3, default=DEFAULT_SHAPE, metavar=("D", "H", "W"),
        help="patch size: the synthetic volumes, or the patches real volumes are cut into")
    add("--foreground", type=float, default=data.FOREGROUND, help="mean lesion fraction of the voxels")
    add("--base-filters", type=int, default=8, help="filters at the first level")
    add("--depth", type=int, default=3, help="U-Net levels, bottleneck included")
    add("--kernel-size", type=int, default=3, help="Conv3D kernel size k (k x k x k)")
    train.add_recipe_arguments(parser, batch_size=2, epochs=8, patience=4, xla=False, unit="volumes")
    add("--mixed-precision", action="store_true", help="mixed_bfloat16 on CPU, mixed_float16 on GPU")
    add("--seed", type=int, default=42, help="seed for data, split, initialization and augmentation")
    add("--experiment", default="tp4-conv3d", help="MLflow experiment name")
    add("--run-name", help="MLflow run name (default: Conv3D_Baseline or Conv3D_MixedPrecision)")
    add("--register", metavar="NAME", help="also register the model in the MLflow model registry")
    add("--skip-training", action="store_true", help="only print the architecture and memory tables")
    add("--compare-2d", action="store_true", help="also train a 2D U-Net on the slices of the same volumes")
    add("--no-peak-memory", action="store_true", help="skip the subprocess measurement of peak memory")
    args = parser.parse_args(argv)
    if min(args.n_volumes, args.batch_size, args.epochs, min(args.shape)) < 1:
        parser.error("--n-volumes, --batch-size, --epochs and --shape must be positive")
    return args, parser


def load_volumes(args):
    """(splits, description): synthetic volumes, or real ones (--data-dir, --dataset) cut into --shape patches."""
    if datasets.source(args):
        return datasets.load_split(datasets.source(args), tuple(args.shape), args.seed)
    images, masks = data.make_synthetic_3d(args.n_volumes, tuple(args.shape), args.seed, foreground=args.foreground)
    splits = data.split(images, masks, seed=args.seed)
    return splits, data.describe(images, masks, "synthetic-3d", splits)


def train3d(args, memory_rows=None, loaded=None):
    """A tracked 3D training run (same MLflow conventions as train.py); `loaded`: load_volumes(args) if done."""
    import train

    keras.utils.set_random_seed(args.seed)
    splits, description = loaded or load_volumes(args)
    policy = ("mixed_float16" if memory.has_gpu() else "mixed_bfloat16") if args.mixed_precision else "float32"
    keras.mixed_precision.set_global_policy(policy)
    try:
        bias = train.prior_bias(args, float(splits["train"][1].mean()))
        model = build_unet3d((*args.shape, 1), args.base_filters, args.depth, args.kernel_size, bias)
        train.compile_model(model, args, len(splits["train"][0]))
        run_name = args.run_name or ("Conv3D_MixedPrecision" if args.mixed_precision else "Conv3D_Baseline")
        run_params = {"architecture": "UNet3D", "depth": args.depth, "base_filters": args.base_filters,
                      "kernel_size": args.kernel_size, "n_params": model.count_params(), "precision": policy,
                      "output_bias": args.output_bias,
                      **train.recipe_params(args), **description}
        print(f"\n{run_name}: {description['data_split']} train/val/test volumes of {description['data_shape']}, "
              f"foreground {description['data_foreground_fraction']:.1%} of voxels, "
              f"{model.count_params():,} parameters")
        tables = {"memory_levers.json": {"rows": memory_rows}} if memory_rows else None
        return train.fit_and_log(model, args, splits, run_name, run_params, orthogonal_slices_figure, "vol", tables)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def train_on_slices(args, loaded=None):
    """The 2D side of Conv2D vs Conv3D: a 2D U-Net (same filters and depth) trained on the slices of the same
    volumes, same split. Its global test Dice pools all test voxels, so it compares with the 3D run's directly."""
    import train

    keras.utils.set_random_seed(args.seed)
    volumes, description = loaded or load_volumes(args)
    splits = {name: (x.reshape(-1, *x.shape[2:]), y.reshape(-1, *y.shape[2:])) for name, (x, y) in volumes.items()}
    description = {**description, "data_slices": "2D slices of the volumes"}
    # 16 slices a step: about the compute of one 3D step; XLA pays for 2D convolutions (see README).
    slice_args = argparse.Namespace(**{**vars(args), "batch_size": 16, "xla": True})
    bias = train.prior_bias(args, float(splits["train"][1].mean()))
    model = unet.build_unet((*args.shape[1:], 1), args.base_filters, args.depth, output_bias=bias, name="UNet2D")
    train.compile_model(model, slice_args, len(splits["train"][0]))
    run_params = {"architecture": "UNet2D on slices", "depth": args.depth, "base_filters": args.base_filters,
                  "n_params": model.count_params(), "output_bias": args.output_bias,
                  **train.recipe_params(slice_args), **description}

    print(f"\nUNet2D_Slices: the same volumes as {len(splits['train'][0])} training slices")
    return train.fit_and_log(model, slice_args, splits, "UNet2D_Slices", run_params, train.prediction_figure)


def print_comparison(args):
    print(f"\n{'Conv2D vs Conv3D (computed from Keras layers)':<58}{'Conv2D':>12}{'Conv3D':>12}")
    k = args.kernel_size
    for label, (two, three) in conv2d_vs_conv3d(size=args.shape[1], depth_slices=args.shape[0], kernel=k).items():
        print(f"{label:<58}{two:>12,.2f}" if isinstance(two, float) else f"{label:<58}{two:>12,}", end="")
        print(f"{three:>12,.2f}" if isinstance(three, float) else f"{three:>12,}")
    net2d = unet.build_unet((args.shape[1], args.shape[2], 1), args.base_filters, args.depth, kernel_size=k)
    net3d = build_unet3d((*args.shape, 1), args.base_filters, args.depth, k)
    print(f"{'parameters of the U-Net (same filters and depth)':<58}{net2d.count_params():>12,}"
          f"{net3d.count_params():>12,}")
    print(f"{'activations per example (2D: one slice), MB':<58}{memory.activation_bytes(net2d) / 2**20:>12,.2f}"
          f"{memory.activation_bytes(net3d) / 2**20:>12,.2f}")


def print_levers(rows, batch):
    print(f"\nmemory levers, batch of {batch}: activations counted from the layers; peak RSS of a fresh process "
          "and its growth during the first training step")
    print(f"{'lever':<48}{'params':>10}{'activations MB':>16}{'peak RSS MB':>13}{'step MB':>9}{'step s':>8}")
    for row in rows:
        measured = "".join(f"{row[key]:>{width}.{digits}f}" if row.get(key) is not None else f"{'n/a':>{width}}"
                           for key, width, digits in (("peak_rss_mb", 13, 0), ("step_mb", 9, 0),
                                                      ("step_seconds", 8, 2)))
        print(f"{row['lever']:<48}{row['params']:>10,}{row['activation_mb']:>16.1f}{measured}")
    base, mixed = rows[0].get("step_seconds"), rows[-1].get("step_seconds")
    if base and mixed and mixed > base:
        print(f"note: {rows[-1]['lever']} is {mixed / base:.1f}x slower than fp32 here: this processor has no "
              "native 16-bit float arithmetic, so it only saves memory")


def main(argv=None):
    import tracking

    args, parser = parse_args(argv)
    with tracking.command_line_errors(parser):
        loaded = None if args.skip_training else load_volumes(args)  # bad data is refused now, not after the tables
        model = build_unet3d((*args.shape, 1), args.base_filters, args.depth, args.kernel_size)
        model.summary(line_length=100)
        print_comparison(args)
        rows = measure_levers(tuple(args.shape), args.base_filters, args.depth, args.batch_size,
                              not args.no_peak_memory)
        print_levers(rows, args.batch_size)
        if not args.skip_training:
            results3d = train3d(args, rows, loaded)
            if args.compare_2d:
                results2d = train_on_slices(args, loaded)
                print(f"\nsame test volumes, global Dice: Conv3D {results3d['test_dice']:.4f}, "
                      f"2D U-Net on slices {results2d['test_dice']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
