"""Exercise 2.3: train the U-Net on synthetic scans or real images, every experiment in MLflow.

What this script teaches:
- a training recipe for segmentation: BCE + Dice loss, Adam, cosine learning-rate decay, flips and
  90-degree rotations, early stopping on validation Dice with the best weights restored;
- honest evaluation: the final numbers come from a held-out test set never used for early stopping,
  computed with metrics.py's exact reference functions;
- experiment tracking: params, one value per epoch for each metric, final test metrics, figures and
  the model itself, in MLflow's local store (`mlflow.db` here; `MLFLOW_TRACKING_URI` to use
  another). See them with `mlflow ui` run from this directory;
- speed chosen for the machine: `--precision auto --xla auto` (the defaults) measure once which
  precision and XLA setting train fastest here, and keep it (speed.py, PERFORMANCE.md).

    python train.py                               # the main job: the TP's setting
    python train.py --loss dice --optimizer sgd   # one cell of the loss x optimizer comparison
    python train.py --grid --image-size 64 --foreground 0.015 --contrast 0.2   # all the cells
    python train.py --dataset mni-wm              # white matter in a real T1 MRI (MNI152)
    python train.py --data-dir DIR                # images/ + masks/, or imagesTr/ + labelsTr/
    python train.py --strategy mirrored           # every GPU of the machine (distribute.py)
"""

import os

# TensorFlow reads this once, when it loads: its INFO lines (CPU features, XLA) off, warnings kept.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import argparse
import itertools
import sys

import keras
import mlflow
import numpy as np

import data
import losses
import unet
from tp4 import cli
from tp4.distributed import distribute, multiworker
from tp4.images import datasets, figures
from tp4.perf import speed
from tp4.tracking import store
from tp4.training import recipe, resume

# The recipe's defaults for train.py (recipe.add_arguments has the others): the TP's main job.
RECIPE_DEFAULTS = dict(batch_size=8, epochs=30, patience=8, unit="images", experiment="tp4-unet")


def parse_args(argv=None):
    parser = cli.argument_parser("train.py", __doc__)
    add = parser.add_argument
    recipe.add_arguments(parser, **RECIPE_DEFAULTS, run_names="UNet_{Loss}_{Optimizer}_{H}x{W}")
    datasets.add_arguments(parser)
    add(
        "--image-size",
        type=cli.at_least(1),
        default=128,
        help="height and width of the network's input (and of the "
        "synthetic images); real images are shrunk to fit and padded (geometry.py)",
    )
    add("--n-images", type=cli.at_least(1), default=200, help="synthetic images (split 70/15/15)")
    add("--foreground", type=float, default=data.FOREGROUND, help="mean lesion share of the pixels")
    add("--contrast", type=float, default=data.CONTRAST, help="lesion brightness above the tissue")
    add("--noise", type=float, default=data.NOISE, help="Rician noise level")
    unet.add_classes_argument(parser)
    unet.add_arguments(parser, base_filters=32, depth=4)
    add(
        "--no-skip",
        action="store_true",
        help="U-Net without skip connections (ablation; run name UNetNoSkip_...)",
    )
    add(
        "--grid",
        action="store_true",
        help="run every loss x optimizer as separate runs and print a table",
    )
    add(
        "--shard",
        type=parse_shard,
        default="0/1",  # argparse parses a default given as text
        metavar="I/N",
        help="with --grid: run only its cells I, I+N, I+2N, ... (I from 0 to N-1), so that N "
        "machines or processes share the grid, logging to one tracking server",
    )
    args = parser.parse_args(argv)
    if args.shard != (0, 1) and not args.grid:
        parser.error("--shard goes with --grid")
    if args.grid and args.save_model:
        parser.error("--save-model saves one model: it does not go with --grid")
    if not grid_cells(args.shard):
        parser.error(
            f"--shard {args.shard[0]}/{args.shard[1]}: the grid has {len(grid_cells())} cells"
        )
    if args.num_classes < 2:
        parser.error("--num-classes must be at least 2 (background included)")
    distribute.check_arguments(parser, args)
    return args, parser


def parse_shard(text):
    """--shard I/N as (I, N), with 0 <= I < N: the I-th of N shares of the grid, from 0."""
    try:
        index, count = (int(number) for number in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N, two whole numbers") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"{text!r}: I/N needs 0 <= I < N")
    return index, count


def grid_cells(shard=(0, 1)):
    """The (loss, optimizer) cells of the grid in a fixed order, every N-th from the I-th for
    shard (I, N): N shards cover each cell once."""
    index, count = shard
    return list(itertools.product(losses.LOSSES, recipe.OPTIMIZERS))[index::count]


def load_data(args):
    """(splits, description, test cases): synthetic scans (test cases None: named by position,
    pixels of 1), or real data (--data-dir, --dataset), checked before any run."""
    if datasets.source(args):
        print(f"reading and checking {datasets.source(args)}", flush=True)
        splits, description, cases = datasets.load_split(
            datasets.source(args), (args.image_size, args.image_size), args.seed, args.num_classes
        )
    else:
        size = f"{args.image_size}x{args.image_size}"
        print(f"generating {args.n_images} synthetic {size} scans (seed {args.seed})", flush=True)
        images, masks = data.make_synthetic_2d(
            args.n_images,
            args.image_size,
            args.seed,
            foreground=args.foreground,
            contrast=args.contrast,
            noise=args.noise,
            num_classes=args.num_classes,
        )
        splits = data.split(images, masks, seed=args.seed)
        description, cases = data.describe(images, masks, "synthetic-2d", splits), None
        description.update(data_contrast=args.contrast, data_noise=args.noise)
    data.require_foreground(splits, description["data_source"])
    return splits, description, cases


def params(args, model, description):
    """Everything needed to know what a run did, as flat MLflow params."""
    return {
        **unet.describe(model),
        "num_classes": args.num_classes,
        "output_bias": args.output_bias,
        **recipe.params(args),
        **description,
    }


def build_model(args, output_bias=0.0):
    """The U-Net of the command line, at the global dtype policy."""
    return unet.build_unet(
        (args.image_size, args.image_size, 1),
        args.base_filters,
        args.depth,
        num_classes=1 if args.num_classes == 2 else args.num_classes,
        batch_norm=distribute.batch_norm(args),
        skip_connections=not args.no_skip,
        output_bias=output_bias,
        name="UNetNoSkip" if args.no_skip else "UNet",
    )


def train(args):
    """One tracked U-Net training run on 2D images; returns the final metrics and the model."""
    splits, description, test_cases = load_data(args)  # bad data is refused before the speed probe
    args = recipe.choose_speed(distribute.with_replicas(args), lambda: build_model(args))
    keras.utils.set_random_seed(args.seed)
    labels = splits["train"][1]
    # The prior: the foreground fraction (sigmoid), or the fraction of each class (softmax).
    if args.num_classes == 2:
        prior = float(labels.mean())
    else:
        prior = [np.mean(labels == c) for c in range(args.num_classes)]
    with speed.policy_scope(args.precision), distribute.strategy(args).scope():
        model = build_model(args, recipe.prior_bias(args, prior))
        recipe.compile_model(model, args, len(splits["train"][0]))
    recipe_name = f"{losses.LOSSES[args.loss].label}_{recipe.OPTIMIZERS[args.optimizer].label}"
    run_name = args.run_name or f"{model.name}_{recipe_name}_{recipe.size_text(model)}"
    print(
        f"{run_name}: {description['data_split']} train/val/test images "
        f"of {description['data_shape']}, foreground {description['data_foreground_fraction']:.1%} "
        f"of pixels, {model.count_params():,} parameters, {args.precision}, "
        f"XLA {'on' if args.xla else 'off'}{distribute.describe(args)}"
    )
    run_params = params(args, model, description)
    results = recipe.fit_and_log(
        model, args, splits, run_name, run_params, figures.prediction_figure, test_cases=test_cases
    )
    return results, model


def run_grid(args):
    """Every loss x optimizer of the shard as a separate run of the same experiment, then a
    Markdown table of their results."""
    rows = []
    for loss, optimizer in grid_cells(args.shard):
        cell = {"loss": loss, "optimizer": optimizer, "run_name": None, "grid": False}
        rows.append(
            (
                losses.LOSSES[loss].label,
                recipe.OPTIMIZERS[optimizer].label,
                train(argparse.Namespace(**{**vars(args), **cell}))[0],
            )
        )
    if args.shard != (0, 1):
        print(
            f"\nshard {args.shard[0]}/{args.shard[1]}: {len(rows)} of the {len(grid_cells())} cells"
        )
    print(
        "\n| loss | optimizer | test Dice | test IoU | per-image Dice | best epoch |"
        "\n|---|---|---|---|---|---|"
    )
    for loss, optimizer, r in sorted(rows, key=lambda row: -row[2]["test_dice"]):
        print(
            f"| {loss} | {optimizer} | {r['test_dice']:.3f} | {r['test_iou']:.3f} | "
            f"{r['test_dice_per_image']:.3f} | {r['best_epoch']} |"
        )


def main(argv=None):
    args, parser = parse_args(argv)
    cli.setup()
    with cli.command_line_errors(parser), multiworker.lost_workers():
        chief = multiworker.is_chief(args)  # under multiworker, the only one that talks to MLflow
        if chief:
            store.open_store()
            if args.resume:
                args = resume.configuration(args, parser, sys.argv[1:] if argv is None else argv)
        args = distribute.setup(args)  # multiworker: the chief's configuration, on every worker
        if args.grid:
            run_grid(args)
            if chief:
                print(f"\nnext: python report.py {args.experiment} --params loss,optimizer")
        else:
            outcome = train(args)[0]
            if chief:
                cli.print_next_steps(outcome, mlflow.get_tracking_uri(), args.save_model)
        distribute.wait_for_the_chief(args)


if __name__ == "__main__":
    sys.exit(main())
