"""Exercise 3: volumetric segmentation with Conv3D, its memory cost, and sliding-window inference.

What this script teaches:
- a Conv3D kernel also slides along depth: k³ weights per input/output channel pair instead of k²
  (27 vs 9 for k=3), so it sees the structure across slices that a 2D network, slice by slice,
  cannot;
- the price is memory: every activation has a depth axis too. The levers the TP names (kernel
  3x3x3 vs 2x2x2, fewer filters, fewer slices, mixed precision) are measured (memory.py), not
  asserted: bfloat16 halves the activations everywhere, and is also faster where the CPU has
  bfloat16 arithmetic;
- a volume larger than the training patch is segmented by overlapping patches whose outputs are
  blended (geometry.sliding_window_predict, which predict.py uses), as in MONAI and nnU-Net;
- training follows the same recipe as train.py (recipe.py) and is tracked in MLflow the same way:
  experiment `tp4-conv3d`.

The 3D U-Net is unet.build_unet3d: unet.py's blocks with Conv3D layers.

    python conv3d.py                       # summary, Conv2D vs Conv3D, memory levers, training
    python conv3d.py --precision bfloat16  # the same training in mixed bfloat16 (auto: fastest)
    python conv3d.py --skip-training       # only the architecture and the memory tables
    python conv3d.py --dataset mni-wm      # white matter in 3D patches of a real T1 MRI (MNI152)
"""

import os

# TensorFlow reads this once, when it loads: its INFO lines (CPU features, XLA) off, warnings kept.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import argparse
import sys

import keras
import mlflow
import numpy as np

import data
import unet
from tp4 import cli
from tp4.distributed import distribute, multiworker
from tp4.images import datasets, figures
from tp4.perf import memory, speed
from tp4.tracking import store
from tp4.training import recipe, resume

DEFAULT_SHAPE = (32, 64, 64)  # (D, H, W) of the synthetic volumes and of the training patch
# The recipe's defaults for conv3d.py (recipe.add_arguments has the others): a few epochs of 3D.
RECIPE_DEFAULTS = dict(batch_size=2, epochs=8, patience=4, unit="volumes", experiment="tp4-conv3d")


# ------------------------------------------------------------------------------------------------
# Tracked training on synthetic volumes.


def parse_args(argv=None):
    parser = cli.argument_parser("conv3d.py", __doc__)
    add = parser.add_argument
    datasets.add_arguments(parser)
    add("--n-volumes", type=cli.at_least(1), default=40, help="synthetic volumes (split 70/15/15)")
    add(
        "--shape",
        type=cli.at_least(1),
        nargs=3,
        default=DEFAULT_SHAPE,
        metavar=("D", "H", "W"),
        help="patch size: the synthetic volumes, or the patches real volumes are cut into",
    )
    add(
        "--foreground",
        type=float,
        default=data.FOREGROUND,
        help="mean lesion fraction of the voxels",
    )
    unet.add_arguments(parser, base_filters=8, depth=3)
    add("--kernel-size", type=int, default=3, help="Conv3D kernel size k (k x k x k)")
    names = "Conv3D_Baseline_{D}x{H}x{W}, or Conv3D_MixedPrecision_... below float32"
    recipe.add_arguments(parser, **RECIPE_DEFAULTS, run_names=names)
    add(
        "--skip-training", action="store_true", help="only print the architecture and memory tables"
    )
    add(
        "--compare-2d",
        action="store_true",
        help="also train a 2D U-Net on the slices of the same volumes",
    )
    add(
        "--slice-batch-size",
        type=cli.at_least(1),
        default=16,
        help="--compare-2d: slices per step (16 slices: about the compute of one 3D step)",
    )
    add(
        "--slice-xla",
        choices=speed.XLA_SETTINGS,
        default="auto",
        help="--compare-2d: XLA for the 2D U-Net (its precision is --precision's)",
    )
    add(
        "--no-peak-memory",
        action="store_true",
        help="skip the subprocess measurement of peak memory",
    )
    args = parser.parse_args(argv)
    distribute.check_arguments(parser, args, ("xla", "slice_xla"))
    return args, parser


def load_volumes(args):
    """(splits, description, test cases): synthetic volumes (test cases None), or real ones
    (--data-dir, --dataset) cut into --shape patches."""
    if datasets.source(args):
        splits, description, cases = datasets.load_split(
            datasets.source(args), tuple(args.shape), args.seed
        )
    else:
        images, masks = data.make_synthetic_3d(
            args.n_volumes, tuple(args.shape), args.seed, foreground=args.foreground
        )
        splits = data.split(images, masks, seed=args.seed)
        description, cases = data.describe(images, masks, "synthetic-3d", splits), None
    data.require_foreground(splits, description["data_source"])
    return splits, description, cases


def train3d(args, memory_rows=None, loaded=None):
    """A tracked 3D training run (same MLflow conventions as train.py); `loaded`: load_volumes(args)
    if done."""
    splits, description, test_cases = loaded or load_volumes(args)

    def build(output_bias=0.0):
        return unet.build_unet3d(
            (*args.shape, 1),
            args.base_filters,
            args.depth,
            args.kernel_size,
            output_bias,
            batch_norm=distribute.batch_norm(args),
        )

    args = recipe.choose_speed(distribute.with_replicas(args), build)
    keras.utils.set_random_seed(args.seed)
    with speed.policy_scope(args.precision), distribute.strategy(args).scope():
        model = build(recipe.prior_bias(args, float(splits["train"][1].mean())))
        recipe.compile_model(model, args, len(splits["train"][0]))
    kind = "Baseline" if args.precision == "float32" else "MixedPrecision"
    run_name = args.run_name or f"Conv3D_{kind}_{recipe.size_text(model)}"
    run_params = {
        **unet.describe(model),
        "output_bias": args.output_bias,
        **recipe.params(args),
        **description,
    }
    print(
        f"\n{run_name}: {description['data_split']} train/val/test volumes "
        f"of {description['data_shape']}, "
        f"foreground {description['data_foreground_fraction']:.1%} of voxels, "
        f"{model.count_params():,} parameters, {args.precision}, XLA {'on' if args.xla else 'off'}"
        f"{distribute.describe(args)}"
    )
    tables = {"memory_levers.json": {"rows": memory_rows}} if memory_rows else None
    return recipe.fit_and_log(
        model,
        args,
        splits,
        run_name,
        run_params,
        figures.orthogonal_slices_figure,
        "vol",
        tables,
        test_cases,
    )


def train_on_slices(args, loaded=None):
    """The 2D side of Conv2D vs Conv3D: a 2D U-Net (same filters and depth) trained on the slices of
    the same volumes, same split. Its global test Dice pools all test voxels, so it compares with
    the 3D run's directly."""
    volumes, description, volume_cases = loaded or load_volumes(args)
    splits = {
        name: (x.reshape(-1, *x.shape[2:]), y.reshape(-1, *y.shape[2:]))
        for name, (x, y) in volumes.items()
    }
    slice_cases = None  # real data: each test volume's slices, with their in-plane voxel size
    if volume_cases:
        depth = args.shape[0]
        slice_cases = data.Cases(
            [f"{case} slice {z}" for case in volume_cases.ids for z in range(depth)],
            np.repeat(volume_cases.spacing[:, 1:], depth, axis=0),
        )
    description = {**description, "data_slices": "2D slices of the volumes"}
    # Its own batch (--slice-batch-size), XLA (--slice-xla); --save-model is the 3D model's.
    own = {"batch_size": args.slice_batch_size, "xla": args.slice_xla, "save_model": None}
    slice_args = argparse.Namespace(**{**vars(args), **own, "slices": True})

    def build(output_bias=0.0):
        return unet.build_unet(
            (*args.shape[1:], 1),
            args.base_filters,
            args.depth,
            kernel_size=args.kernel_size,
            batch_norm=distribute.batch_norm(args),
            output_bias=output_bias,
            name="UNet2D",
        )

    slice_args = recipe.choose_speed(distribute.with_replicas(slice_args), build)
    slice_args.slice_xla = slice_args.xla  # resolved in config.json: --resume keeps this choice
    keras.utils.set_random_seed(args.seed)
    with speed.policy_scope(slice_args.precision), distribute.strategy(args).scope():
        model = build(recipe.prior_bias(args, float(splits["train"][1].mean())))
        recipe.compile_model(model, slice_args, len(splits["train"][0]))
    run_params = {
        **unet.describe(model),
        "architecture": "UNet2D on slices",
        "output_bias": args.output_bias,
        **recipe.params(slice_args),
        **description,
    }
    run_name = f"UNet2D_Slices_{recipe.size_text(model)}"
    print(
        f"\n{run_name}: the same volumes as {len(splits['train'][0])} training slices, "
        f"batch {slice_args.batch_size}, {slice_args.precision}, "
        f"XLA {'on' if slice_args.xla else 'off'}{distribute.describe(slice_args)}"
    )
    return recipe.fit_and_log(
        model,
        slice_args,
        splits,
        run_name,
        run_params,
        figures.prediction_figure,
        test_cases=slice_cases,
    )


def main(argv=None):
    args, parser = parse_args(argv)
    cli.setup()
    with cli.command_line_errors(parser), multiworker.lost_workers():
        # Under multiworker, the chief is the only process that talks to MLflow.
        chief = multiworker.is_chief(args)
        if chief and (args.resume or not args.skip_training):
            store.open_store()
            if args.resume:
                args = resume.configuration(args, parser, sys.argv[1:] if argv is None else argv)
        args = distribute.setup(args)  # multiworker: the chief's configuration, on every worker
        if args.resume:  # only the interrupted run (its config.json says which of the two)
            resumed = train_on_slices(args) if getattr(args, "slices", False) else train3d(args)
            if chief:
                cli.print_next_steps(resumed, mlflow.get_tracking_uri(), args.save_model)
            distribute.wait_for_the_chief(args)
            return
        # Bad data is refused now, not after the tables.
        loaded = None if args.skip_training else load_volumes(args)
        rows = None
        if chief:  # the tables are the chief's to print
            model = unet.build_unet3d(
                (*args.shape, 1), args.base_filters, args.depth, args.kernel_size
            )
            model.summary(line_length=100)
            memory.print_comparison(args.shape, args.base_filters, args.depth, args.kernel_size)
            rows = memory.measure_levers(
                tuple(args.shape),
                args.base_filters,
                args.depth,
                args.batch_size,
                not args.no_peak_memory,
            )
            memory.print_levers(rows, args.batch_size)
        if not args.skip_training:
            results3d = train3d(args, rows, loaded)
            if args.compare_2d:
                results2d = train_on_slices(args, loaded)
                print(
                    f"\nsame test volumes, global Dice: Conv3D {results3d['test_dice']:.4f}, "
                    f"2D U-Net on slices {results2d['test_dice']:.4f}"
                )
            if chief:
                cli.print_next_steps(results3d, mlflow.get_tracking_uri(), args.save_model)
        distribute.wait_for_the_chief(args)


if __name__ == "__main__":
    sys.exit(main())
