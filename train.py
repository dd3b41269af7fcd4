"""Exercise 2.3: train the U-Net on synthetic scans or real images and track every experiment in MLflow.

What this script teaches:
- a training recipe for segmentation: BCE + Dice loss, Adam, cosine learning-rate decay, flips and 90-degree
  rotations, early stopping on validation Dice with the best weights restored;
- honest evaluation: the final numbers come from a held-out test set never used for early stopping, computed
  with metrics.py's exact reference functions;
- experiment tracking: params, one value per epoch for each metric, final test metrics, figures and the model
  itself, in MLflow's local store (`mlflow.db` here; `MLFLOW_TRACKING_URI` to use another). See them with
  `mlflow ui` run from this directory.

    python train.py                                    # the main job: the TP's setting, about 12 min on 2 cores
    python train.py --loss dice --optimizer sgd        # one cell of the loss x optimizer comparison
    python train.py --grid --image-size 64 --foreground 0.015 --contrast 0.2   # the whole comparison
    python train.py --dataset mni-wm                   # white matter in a real T1 MRI (nilearn's MNI152)
    python train.py --data-dir DIR                     # your data: images/ + masks/, or imagesTr/ + labelsTr/
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import data
import datasets
import metrics
import tracking
import unet

LOSS_NAMES = {"bce": "BCELoss", "dice": "DiceLoss", "bce_dice": "CombinedLoss", "tversky": "TverskyLoss",
              "focal_tversky": "FocalTverskyLoss", "generalized_dice": "GeneralizedDiceLoss"}
# Each optimizer at its usual learning rate, so the comparison is between optimizers, not between learning rates.
OPTIMIZERS = {
    "adam": ("Adam", 1e-3, lambda lr: keras.optimizers.Adam(lr)),
    "adamw": ("AdamW", 1e-3, lambda lr: keras.optimizers.AdamW(lr, weight_decay=1e-4)),
    "sgd": ("SGD", 1e-2, lambda lr: keras.optimizers.SGD(lr, momentum=0.9, nesterov=True)),
    "rmsprop": ("RMSprop", 1e-3, lambda lr: keras.optimizers.RMSprop(lr)),
}
SCHEDULES = ("cosine", "plateau", "constant")
EVAL_BATCH_FACTOR = 4  # validation and test batches, in training batches (fit_and_log)


def add_recipe_arguments(parser, batch_size, epochs, patience, xla, unit):
    """The training recipe's flags, shared with conv3d.py (only the defaults differ)."""
    add = parser.add_argument
    add("--loss", choices=LOSS_NAMES, default="bce_dice", help="training loss")
    add("--optimizer", choices=OPTIMIZERS, default="adam", help="optimizer")
    add("--lr", type=float, help="peak learning rate (default: 1e-3, or 1e-2 for sgd)")
    add("--lr-schedule", choices=SCHEDULES, default="cosine", help="learning-rate schedule over --epochs")
    add("--batch-size", type=int, default=batch_size, help=f"{unit} per step")
    add("--xla", action=argparse.BooleanOptionalAction, default=xla,
        help="compile the steps with XLA (measured: 1.2x faster for the 2D U-Net, 3x slower for Conv3D on CPU)")
    add("--epochs", type=int, default=epochs, help="maximum number of epochs")
    add("--patience", type=int, default=patience, help="early stopping: epochs without a better validation Dice")
    add("--no-augment", action="store_true", help="no random flips and 90-degree rotations (in-plane for volumes)")
    add("--output-bias", choices=("prior", "zero"), default="prior",
        help="initial output bias: the training set's lesion prior log(f/(1-f)), or 0 (p = 0.5 everywhere)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add_recipe_arguments(parser, batch_size=8, epochs=30, patience=8, xla=True, unit="images")
    datasets.add_arguments(parser)
    add("--n-images", type=int, default=200, help="number of synthetic images (train/val/test 70/15/15)")
    add("--image-size", type=int, default=128, help="height and width of the network's input (and of the "
        "synthetic images); real images are shrunk to fit and padded (geometry.py)")
    add("--foreground", type=float, default=data.FOREGROUND, help="mean lesion fraction of the pixels")
    add("--contrast", type=float, default=data.CONTRAST, help="lesion brightness above the tissue")
    add("--noise", type=float, default=data.NOISE, help="Rician noise level")
    add("--base-filters", type=int, default=32, help="U-Net filters at the first level")
    add("--depth", type=int, default=4, help="U-Net levels, bottleneck included")
    add("--no-skip", action="store_true", help="U-Net without skip connections (ablation; run name UNetNoSkip_...)")
    add("--seed", type=int, default=42, help="seed for data, split, initialization and augmentation")
    add("--experiment", default="tp4-unet", help="MLflow experiment name")
    add("--run-name", help="MLflow run name (default: UNet_{Loss}_{Optimizer})")
    add("--register", metavar="NAME", help="also register the model in the MLflow model registry as NAME")
    add("--grid", action="store_true", help="run every loss x optimizer as separate runs and print a table")
    args = parser.parse_args(argv)
    for name in ("batch_size", "epochs", "n_images", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.patience < 0 or (args.lr is not None and args.lr <= 0):
        parser.error("--patience must be >= 0 and --lr > 0")
    return args, parser


def load_data(args):
    """(splits, description): synthetic scans, or real data (--data-dir, --dataset), checked before any run."""
    if datasets.source(args):
        return datasets.load_split(datasets.source(args), (args.image_size, args.image_size), args.seed)
    images, masks = data.make_synthetic_2d(args.n_images, args.image_size, args.seed, foreground=args.foreground,
                                           contrast=args.contrast, noise=args.noise)
    splits = data.split(images, masks, seed=args.seed)
    description = data.describe(images, masks, "synthetic-2d", splits)
    return splits, {**description, "data_contrast": args.contrast, "data_noise": args.noise}


def peak_learning_rate(args):
    """--lr, or the optimizer's usual learning rate."""
    return args.lr or OPTIMIZERS[args.optimizer][1]


def epoch_size(n_train, args):
    """(batches, images) of one training epoch. With XLA, full batches only: XLA compiles one program per batch
    shape, and a partial last batch would cost a second compile of the training step (seconds, in the first epoch)
    for a few images. The reshuffle at every epoch changes which images wait for the next one."""
    if not args.xla:
        return -(-n_train // args.batch_size), n_train
    if n_train < args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {n_train} training examples")
    batches = n_train // args.batch_size
    return batches, batches * args.batch_size


def learning_rate(args, steps_per_epoch):
    peak = peak_learning_rate(args)
    if args.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(peak, decay_steps=args.epochs * steps_per_epoch, alpha=0.01)
    return peak


def prior_bias(args, foreground):
    """Initial output bias: the logit of the training set's foreground fraction, or 0."""
    if args.output_bias == "prior" and 0 < foreground < 1:
        return float(np.log(foreground / (1 - foreground)))
    return 0.0


def compile_model(model, args, n_train):
    """Optimizer, schedule (over the steps of n_train examples per epoch), loss and the Dice/IoU epoch metrics."""
    optimizer = OPTIMIZERS[args.optimizer][2](learning_rate(args, epoch_size(n_train, args)[0]))
    model.compile(optimizer, metrics.get_loss(args.loss), metrics=[metrics.DiceMetric(), metrics.IoUMetric()],
                  jit_compile=args.xla)
    return model


def recipe_params(args):
    """The training recipe as flat MLflow params (shared with conv3d.py)."""
    return {
        "optimizer": OPTIMIZERS[args.optimizer][0], "learning_rate": peak_learning_rate(args),
        "lr_schedule": args.lr_schedule, "loss": LOSS_NAMES[args.loss], "batch_size": args.batch_size,
        "epochs": args.epochs, "patience": args.patience, "augment": not args.no_augment, "seed": args.seed,
        "xla": args.xla,
    }


def params(args, model, description):
    """Everything needed to know what a run did, as flat MLflow params."""
    return {
        "architecture": model.name, "depth": args.depth, "base_filters": args.base_filters,
        "n_params": model.count_params(), "upsampling": "transpose", "batch_norm": True,
        "skip_connections": not args.no_skip, "output_bias": args.output_bias, **recipe_params(args), **description,
    }


def evaluate(model, images, masks, batch_size):
    """Test metrics (metrics.py's reference functions) and the training loss over the whole test set, all from
    one set of predictions: one forward pass."""
    probabilities = model.predict(images, batch_size=batch_size, verbose=0)
    return {
        "test_dice": metrics.dice_coefficient(masks, probabilities),
        "test_iou": metrics.iou_score(masks, probabilities),
        "test_dice_per_image": metrics.dice_coefficient(masks, probabilities, per_image=True),
        "test_loss": float(model.loss(masks, probabilities)),
    }, probabilities


def prediction_figure(images, masks, probabilities, n=6):
    """The `n` test images with the most foreground, ground-truth (green) and predicted (red) contours.

    The most foreground, not the first: slices at the top of a brain hold almost no white matter.
    """
    n = min(n, len(images))
    shown = np.argsort(-masks.reshape(len(masks), -1).sum(axis=1), kind="stable")[:n]
    fig, axes = tracking.plt.subplots(1, n, figsize=(2.6 * n, 2.9), squeeze=False)
    for ax, image, mask, probability in zip(axes[0], images[shown], masks[shown], probabilities[shown]):
        dice = metrics.dice_coefficient(mask, probability)
        tracking.contour_panel(ax, image[..., 0], mask[..., 0], probability[..., 0], f"Dice {dice:.3f}")
    fig.suptitle("test images: ground truth (green), prediction (red)")
    return fig


def fit_and_log(model, args, splits, run_name, run_params, prediction_figure, unit="img", tables=None):
    """Fit with early stopping on validation Dice, evaluate on the test set, log it all in one MLflow run.

    Shared by train.py and conv3d.py: one logging path for 2D and 3D. Returns the final metrics.
    """
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = splits["train"], splits["val"], splits["test"]
    train_set = data.make_dataset(x_train, y_train, args.batch_size, True, not args.no_augment, args.seed,
                                  drop_remainder=args.xla)
    # Evaluation keeps no activations for a backward pass, so larger batches fit: fewer calls, and fewer batch
    # shapes for XLA to compile (the 30 validation images: one batch of 30 instead of 8, 8, 8 and 6).
    eval_batch = EVAL_BATCH_FACTOR * args.batch_size
    val_set = data.make_dataset(x_val, y_val, eval_batch)
    with tracking.tracked_run(args.experiment, run_name, run_params) as run:
        callbacks = [tracking.EpochLogger(epoch_size(len(x_train), args)[1], args.epochs, unit),
                     keras.callbacks.EarlyStopping("val_dice", mode="max", patience=args.patience,
                                                   restore_best_weights=True, verbose=0)]
        if args.lr_schedule == "plateau":
            callbacks.append(keras.callbacks.ReduceLROnPlateau("val_dice", mode="max", factor=0.5, patience=3))
        start = time.perf_counter()
        history = model.fit(train_set, validation_data=val_set, epochs=args.epochs, callbacks=callbacks,
                            shuffle=False, verbose=0).history
        fit_seconds = time.perf_counter() - start

        results, probabilities = evaluate(model, x_test, y_test, eval_batch)
        results["best_epoch"] = int(np.argmax(history["val_dice"])) + 1
        results["epochs_run"] = len(history["loss"])
        results["fit_seconds"] = fit_seconds
        figures = {"test_predictions.png": prediction_figure(x_test, y_test, probabilities)}
        example = (x_test[:1], probabilities[:1])
        tracking.log_results(run, model, results, history, example, figures, vars(args), args.register, tables)
    print_results(run_name, results, len(x_test))
    return results


def train(args):
    """One tracked U-Net training run on 2D images; returns the final metrics and the trained model."""
    keras.utils.set_random_seed(args.seed)
    splits, description = load_data(args)
    bias = prior_bias(args, float(splits["train"][1].mean()))
    model = unet.build_unet((args.image_size, args.image_size, 1), args.base_filters, args.depth,
                            skip_connections=not args.no_skip, output_bias=bias,
                            name="UNetNoSkip" if args.no_skip else "UNet")
    compile_model(model, args, len(splits["train"][0]))
    run_name = args.run_name or f"{model.name}_{LOSS_NAMES[args.loss]}_{OPTIMIZERS[args.optimizer][0]}"
    print(f"{run_name}: {description['data_split']} train/val/test images of {description['data_shape']}, "
          f"foreground {description['data_foreground_fraction']:.1%} of pixels, {model.count_params():,} parameters")
    results = fit_and_log(model, args, splits, run_name, params(args, model, description), prediction_figure)
    return results, model


def print_results(run_name, results, n_test):
    """The final table: test metrics from metrics.py's reference functions."""
    print(f"\n{run_name}: best epoch {results['best_epoch']} of {results['epochs_run']}, "
          f"fit {results['fit_seconds']:.0f} s")
    print(f"{f'test set ({n_test} examples)':<28}{'value':>8}")
    for label, key in (("Dice", "test_dice"), ("IoU", "test_iou"), ("Dice, per-image mean", "test_dice_per_image"),
                       ("loss", "test_loss")):
        print(f"{label:<28}{results[key]:>8.4f}")


def run_grid(args):
    """Every loss x optimizer as a separate run of the same experiment, then a Markdown table of the results."""
    rows = []
    for loss in LOSS_NAMES:
        for optimizer in OPTIMIZERS:
            cell = argparse.Namespace(**{**vars(args), "loss": loss, "optimizer": optimizer, "run_name": None})
            rows.append((LOSS_NAMES[loss], OPTIMIZERS[optimizer][0], train(cell)[0]))
    print("\n| loss | optimizer | test Dice | test IoU | per-image Dice | best epoch |\n|---|---|---|---|---|---|")
    for loss, optimizer, r in sorted(rows, key=lambda row: -row[2]["test_dice"]):
        print(f"| {loss} | {optimizer} | {r['test_dice']:.3f} | {r['test_iou']:.3f} | "
              f"{r['test_dice_per_image']:.3f} | {r['best_epoch']} |")


def main(argv=None):
    args, parser = parse_args(argv)
    with tracking.command_line_errors(parser):
        run_grid(args) if args.grid else train(args)


if __name__ == "__main__":
    sys.exit(main())
