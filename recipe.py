"""The training recipe shared by train.py (2D) and conv3d.py (3D): from a model to a tracked run.

What this module teaches:
- a segmentation recipe: BCE + Dice loss, Adam, cosine learning-rate decay, flips and 90-degree
  rotations, the output bias at the lesion prior, early stopping on validation Dice with the best
  weights restored;
- honest evaluation: the final numbers come from a held-out test set never used for early
  stopping, computed with metrics.py's exact reference functions;
- one logging path for 2D and 3D (tracking.py): params, one value per epoch and metric, test
  metrics, figures and the model.

The data path reads one way: data.py -> unet.py / metrics.py -> recipe.py -> tracking.py.
"""

import argparse
import time
from collections.abc import Callable
from typing import NamedTuple

import keras
import numpy as np

import data
import figures
import metrics
import speed
import tracking


class Optimizer(NamedTuple):
    """An optimizer choice: display name (MLflow param, run names), usual learning rate,
    constructor."""

    label: str
    learning_rate: float
    make: Callable[[object], keras.optimizers.Optimizer]


# Each optimizer at its usual learning rate: the comparison is between optimizers, not learning
# rates.
OPTIMIZERS = {
    "adam": Optimizer("Adam", 1e-3, lambda lr: keras.optimizers.Adam(lr)),
    "adamw": Optimizer("AdamW", 1e-3, lambda lr: keras.optimizers.AdamW(lr, weight_decay=1e-4)),
    "sgd": Optimizer("SGD", 1e-2, lambda lr: keras.optimizers.SGD(lr, momentum=0.9, nesterov=True)),
    "rmsprop": Optimizer("RMSprop", 1e-3, lambda lr: keras.optimizers.RMSprop(lr)),
}
SCHEDULES = ("cosine", "plateau", "constant")
EVAL_BATCH_FACTOR = 4  # validation and test batches, in training batches (fit_and_log)


def add_arguments(parser, batch_size, epochs, patience, unit, experiment, run_names):
    """The recipe's and the run's flags, shared by train.py and conv3d.py (defaults differ)."""
    add = parser.add_argument
    add("--loss", choices=metrics.LOSSES, default="bce_dice", help="training loss")
    add("--optimizer", choices=OPTIMIZERS, default="adam", help="optimizer")
    add(
        "--lr",
        type=float,
        help="peak learning rate [default: the optimizer's usual one: "
        + ", ".join(f"{o.label} {o.learning_rate:g}" for o in OPTIMIZERS.values())
        + "]",
    )
    add(
        "--lr-schedule",
        choices=SCHEDULES,
        default="cosine",
        help="learning-rate schedule over --epochs",
    )
    add("--batch-size", type=int, default=batch_size, help=f"{unit} per step")
    speed.add_arguments(parser)
    add("--epochs", type=int, default=epochs, help="maximum number of epochs")
    add(
        "--patience",
        type=int,
        default=patience,
        help="early stopping: epochs without a better validation Dice",
    )
    add(
        "--no-augment",
        action="store_true",
        help="no random flips and 90-degree rotations (in-plane for volumes)",
    )
    add(
        "--output-bias",
        choices=("prior", "zero"),
        default="prior",
        help="initial output bias: the training set's lesion prior log(f/(1-f)), "
        "or 0 (p = 0.5 everywhere)",
    )
    add(
        "--seed", type=int, default=42, help="seed for data, split, initialization and augmentation"
    )
    add("--experiment", default=experiment, help="MLflow experiment name")
    add("--run-name", help=f"MLflow run name [default: {run_names}]")
    add(
        "--register",
        metavar="NAME",
        help="also register the model in the MLflow model registry as NAME",
    )


def peak_learning_rate(args):
    """--lr, or the optimizer's usual learning rate."""
    return args.lr or OPTIMIZERS[args.optimizer].learning_rate


def choose_speed(args, build):
    """`args` with --precision and --xla resolved for this machine (speed.choose: `auto` measured on
    the model `build()` makes, at --batch-size, and cached). Call it before seeding."""
    choice = speed.choose(args.precision, args.xla, build, args.batch_size)
    return argparse.Namespace(**{**vars(args), "precision": choice.precision, "xla": choice.xla})


def epoch_size(n_train, args):
    """(batches, images) of one training epoch. With XLA, full batches only: XLA compiles one
    program per batch shape, and a partial last batch would cost a second compile of the training
    step for a few
    images. The reshuffle at every epoch changes which images wait for the next one."""
    if not args.xla:
        return -(-n_train // args.batch_size), n_train
    if n_train < args.batch_size:
        raise ValueError(
            f"--batch-size {args.batch_size} is larger than the {n_train} training examples"
        )
    batches = n_train // args.batch_size
    return batches, batches * args.batch_size


def learning_rate(args, steps_per_epoch):
    """The peak learning rate, as a cosine decay over --epochs if that is the schedule."""
    peak = peak_learning_rate(args)
    if args.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            peak, decay_steps=args.epochs * steps_per_epoch, alpha=0.01
        )
    return peak


def prior_bias(args, foreground):
    """Initial output bias: the logit of the training set's foreground fraction, or 0."""
    if args.output_bias == "prior" and 0 < foreground < 1:
        return float(np.log(foreground / (1 - foreground)))
    return 0.0


def compile_model(model, args, n_train):
    """Optimizer, schedule (over the steps of n_train examples per epoch), loss and Dice/IoU epoch
    metrics."""
    optimizer = OPTIMIZERS[args.optimizer].make(learning_rate(args, epoch_size(n_train, args)[0]))
    model.compile(
        optimizer,
        metrics.get_loss(args.loss),
        metrics=[metrics.DiceMetric(), metrics.IoUMetric()],
        jit_compile=args.xla,
    )
    return model


def params(args):
    """The recipe as flat MLflow params."""
    return {
        "optimizer": OPTIMIZERS[args.optimizer].label,
        "learning_rate": peak_learning_rate(args),
        "lr_schedule": args.lr_schedule,
        "loss": metrics.LOSSES[args.loss].label,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "patience": args.patience,
        "augment": not args.no_augment,
        "seed": args.seed,
        "precision": args.precision,
        "xla": args.xla,
    }


def evaluate(model, images, masks, batch_size):
    """Test metrics (metrics.py's reference functions) and the training loss over the whole test
    set, all
    from one set of predictions: one forward pass. Returns (metrics, probabilities)."""
    probabilities = model.predict(images, batch_size=batch_size, verbose=0)
    return {
        "test_dice": metrics.dice_coefficient(masks, probabilities),
        "test_iou": metrics.iou_score(masks, probabilities),
        "test_dice_per_image": metrics.dice_coefficient(masks, probabilities, per_image=True),
        "test_loss": float(model.loss(masks, probabilities)),
    }, probabilities


def fit_and_log(
    model, args, splits, run_name, run_params, prediction_figure, unit="img", tables=None
):
    """Fit with early stopping on validation Dice, evaluate on the test set, log it all in one
    MLflow run.

    `prediction_figure(images, masks, probabilities)` draws the test predictions (figures.py).
    Returns the final metrics, and `tracking_seconds`: the time spent in MLflow.
    """
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        splits["train"],
        splits["val"],
        splits["test"],
    )
    train_set = data.make_dataset(
        x_train,
        y_train,
        args.batch_size,
        True,
        not args.no_augment,
        args.seed,
        drop_remainder=args.xla,
    )
    # Evaluation keeps no activations for a backward pass, so larger batches fit: fewer calls, and
    # fewer batch shapes for XLA to compile (the 30 validation images: one batch of 30 instead of 8,
    # 8, 8 and 6).
    eval_batch = EVAL_BATCH_FACTOR * args.batch_size
    val_set = data.make_dataset(x_val, y_val, eval_batch)
    with tracking.tracked_run(args.experiment, run_name, run_params) as run:
        callbacks = [
            tracking.EpochLogger(run, epoch_size(len(x_train), args)[1], args.epochs, unit),
            keras.callbacks.EarlyStopping(
                "val_dice", mode="max", patience=args.patience, restore_best_weights=True, verbose=0
            ),
        ]
        if args.lr_schedule == "plateau":
            callbacks.append(
                keras.callbacks.ReduceLROnPlateau("val_dice", mode="max", factor=0.5, patience=3)
            )
        start = time.perf_counter()
        history = model.fit(
            train_set,
            validation_data=val_set,
            epochs=args.epochs,
            callbacks=callbacks,
            shuffle=False,
            verbose=0,
        ).history
        fit_seconds = time.perf_counter() - start

        results, probabilities = evaluate(model, x_test, y_test, eval_batch)
        results["best_epoch"] = int(np.argmax(history["val_dice"])) + 1
        results["epochs_run"] = len(history["loss"])
        results["fit_seconds"] = fit_seconds
        pictures = {
            "training_curves.png": figures.training_curves(history, results["best_epoch"]),
            "test_predictions.png": prediction_figure(x_test, y_test, probabilities),
        }
        example = (x_test[:1], probabilities[:1])
        run.log_results(model, results, example, pictures, vars(args), args.register, tables)
    print_results(run_name, results, len(x_test))
    return {**results, "tracking_seconds": run.seconds}


def print_results(run_name, results, n_test):
    """The final table: test metrics from metrics.py's reference functions."""
    print(
        f"\n{run_name}: best epoch {results['best_epoch']} of {results['epochs_run']}, "
        f"fit {results['fit_seconds']:.0f} s"
    )
    print(f"{f'test set ({n_test} examples)':<28}{'value':>8}")
    for label, key in (
        ("Dice", "test_dice"),
        ("IoU", "test_iou"),
        ("Dice, per-image mean", "test_dice_per_image"),
        ("loss", "test_loss"),
    ):
        print(f"{label:<28}{results[key]:>8.4f}")
