"""The training recipe shared by train.py (2D) and conv3d.py (3D): from a model to a tracked run.

What this module teaches:
- a segmentation recipe: BCE + Dice loss, Adam, cosine learning-rate decay, flips and 90-degree
  rotations, the output bias at the lesion prior, early stopping on validation Dice with the best
  weights restored;
- honest evaluation: the final numbers come from a held-out test set never used for early
  stopping, computed case by case with metrics.py's exact reference functions (evaluation.py:
  Dice, IoU, HD95, NSD, per class), optionally with test-time mirroring (`--tta`);
- one logging path for 2D and 3D (runs.py): params, one value per epoch and metric, test
  metrics, figures and the model.

The data path reads one way: data.py -> unet.py / metrics.py -> recipe.py -> runs.py.
"""

import argparse
from collections.abc import Callable
from typing import NamedTuple

import keras
import numpy as np

import data
import losses
from tp4 import cli
from tp4.distributed import distribute, multiworker
from tp4.images import figures, geometry
from tp4.perf import speed
from tp4.tracking import runs
from tp4.training import checkpoint, divergence, evaluation, resume


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
    add("--loss", choices=losses.LOSSES, default="bce_dice", help="training loss")
    add("--optimizer", choices=OPTIMIZERS, default="adam", help="optimizer")
    add(
        "--lr",
        type=cli.positive,
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
    add(
        "--batch-size",
        type=cli.at_least(1),
        default=batch_size,
        help=f"{unit} per step and replica",
    )
    distribute.add_arguments(parser)
    speed.add_arguments(parser)
    add("--epochs", type=cli.at_least(1), default=epochs, help="maximum number of epochs")
    add(
        "--patience",
        type=cli.at_least(0),
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
    add(
        "--tta",
        action="store_true",
        help="test-time mirroring: average the test predictions over every flip of the spatial "
        "axes (4 in 2D, 8 in 3D)",
    )
    add(
        "--nsd-tolerance",
        type=cli.at_least(0, float),
        default=1.0,
        help="normalized surface Dice tolerance, in the unit of the voxel spacing (mm for NIfTI, "
        "pixels otherwise)",
    )
    add("--experiment", default=experiment, help="MLflow experiment name")
    add("--run-name", help=f"MLflow run name [default: {run_names}]")
    add(
        "--register",
        metavar="NAME",
        help="also register the model in the MLflow model registry as NAME",
    )
    add(
        "--save-model",
        metavar="PATH.keras",
        help="also save the trained model as a .keras file (predict.py takes it, MLflow aside)",
    )
    resume.add_arguments(parser)


def size_text(model):
    """The model's input size, "128x128" or "32x64x64": part of the run names, since runs of one
    recipe at several sizes would otherwise share a name."""
    return "x".join(str(size) for size in model.input_shape[1:-1])


def peak_learning_rate(args):
    """--lr, or the optimizer's usual learning rate."""
    return args.lr if args.lr is not None else OPTIMIZERS[args.optimizer].learning_rate


def choose_speed(args, build):
    """`args` with --precision and --xla resolved for this machine (speed.choose: `auto` measured on
    the model `build()` makes, at --batch-size, and cached). Call it before seeding. Under a
    strategy: XLA off, the precision measured on one replica (the chief's choice for all)."""
    xla = "off" if args.strategy != "none" else args.xla
    precision, xla = multiworker.from_chief(
        distribute.strategy(args), lambda: speed.choose(args.precision, xla, build, args.batch_size)
    )
    return argparse.Namespace(**{**vars(args), "precision": precision, "xla": xla})


def epoch_size(n_train, args):
    """(batches, images) of one training epoch. With XLA, full batches only: XLA compiles one
    program per batch shape, and a partial last batch would cost a second compile of the training
    step for a few images. With several replicas too: each has its share of every batch. The
    reshuffle at every epoch changes which images wait for the next one."""
    batch = distribute.global_batch(args)
    if not (args.xla or args.replicas > 1):
        return -(-n_train // batch), n_train
    if n_train < batch:
        replicas = f" x {args.replicas} replicas" if args.replicas > 1 else ""
        raise ValueError(
            f"--batch-size {args.batch_size}{replicas} is larger than the {n_train} training "
            "examples"
        )
    batches = n_train // batch
    return batches, batches * batch


def learning_rate(args, steps_per_epoch):
    """The peak learning rate, as a cosine decay over --epochs if that is the schedule."""
    peak = peak_learning_rate(args)
    if args.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            peak, decay_steps=args.epochs * steps_per_epoch, alpha=0.01
        )
    return peak


def prior_bias(args, foreground):
    """Initial output bias: the logit of the training set's foreground fraction (a sigmoid output),
    the log of each class's fraction (a list, background first: a softmax output), or 0."""
    if np.ndim(foreground) == 1:  # softmax(log f) = f
        prior = args.output_bias == "prior"
        return [float(np.log(max(f, 1e-6))) if prior else 0.0 for f in foreground]
    if args.output_bias == "prior" and 0 < foreground < 1:
        return float(np.log(foreground / (1 - foreground)))
    return 0.0


def compile_model(model, args, n_train):
    """Optimizer, schedule (over the steps of n_train examples per epoch), loss and Dice/IoU epoch
    metrics (mean over the foreground classes of a softmax output)."""
    optimizer = OPTIMIZERS[args.optimizer].make(learning_rate(args, epoch_size(n_train, args)[0]))
    model.compile(
        optimizer,
        losses.get_loss(args.loss),
        metrics=losses.overlap_metrics(model),
        jit_compile=args.xla,
    )
    return model


def params(args):
    """The recipe as flat MLflow params."""
    return {
        "optimizer": OPTIMIZERS[args.optimizer].label,
        "learning_rate": peak_learning_rate(args),
        "lr_schedule": args.lr_schedule,
        "loss": losses.LOSSES[args.loss].label,
        "batch_size": args.batch_size,
        **distribute.params(args),
        "epochs": args.epochs,
        "patience": args.patience,
        "augment": not args.no_augment,
        "seed": args.seed,
        "precision": args.precision,
        "xla": args.xla,
        "tta": args.tta,
        "nsd_tolerance": args.nsd_tolerance,
    }


def evaluate(model, images, masks, batch_size, tta=False, cases=None, tolerance=1.0):
    """Test metrics (evaluation.test_metrics: overlap and surface, per case and class) and the
    training loss over the whole test set, all from one set of predictions: one forward pass, or one
    per flip with test-time mirroring (tta). `cases`: names and voxel sizes of the test examples
    (None: synthetic). Returns (metrics, probabilities, per-case table)."""

    def predict(batch):
        return distribute.predict(model, batch, batch_size)

    probabilities = geometry.predict_mirrored(predict, images) if tta else predict(images)
    results, table = evaluation.test_metrics(masks, probabilities, cases, tolerance)
    results["test_loss"] = float(model.loss(masks, probabilities))
    return results, probabilities, table


def fit_and_log(
    model,
    args,
    splits,
    run_name,
    run_params,
    prediction_figure,
    unit="img",
    tables=None,
    test_cases=None,
):
    """Fit with early stopping on validation Dice, evaluate on the test set, log it all in one
    MLflow run. A checkpoint is saved every epoch (checkpoint.py); with args.resume (a run id),
    the run continues from it.

    `prediction_figure(images, masks, probabilities)` draws the test predictions (figures.py);
    `test_cases` names the test examples and gives their voxel sizes (data.Cases; None: synthetic),
    for the per-case table (`test_cases.json`). Returns the final metrics, `tracking_seconds` (the
    time the training waited on MLflow) and where the run is: run_id, experiment_id, model_uri.
    """
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        splits["train"],
        splits["val"],
        splits["test"],
    )
    train_set = data.make_dataset(
        x_train,
        y_train,
        distribute.global_batch(args),
        True,
        not args.no_augment,
        args.seed,
        drop_remainder=args.xla or args.replicas > 1,  # as epoch_size
    )
    # Evaluation keeps no activations for a backward pass, so larger batches fit: fewer calls, and
    # fewer batch shapes for XLA to compile (the 30 validation images: one batch of 30 instead of 8,
    # 8, 8 and 6).
    eval_batch = EVAL_BATCH_FACTOR * distribute.global_batch(args)
    val_set = data.make_dataset(x_val, y_val, eval_batch)
    validation = [distribute.Validation(x_val, y_val, eval_batch)] if args.replicas > 1 else []
    if args.save_model:
        cli.check_output_file("--save-model", args.save_model, ".keras")  # not after training
    # config.json: the configuration as resolved (what --resume reads back).
    config = {**vars(args), "lr": peak_learning_rate(args), "run_name": run_name}
    artifacts = {"config.json": config, **(tables or {})}
    tracked = runs.tracked_run(  # entered by the chief only (multiworker.py)
        args.experiment, run_name, run_params, artifacts, args.checkpoint_dir, args.resume
    )
    with multiworker.tracked_on_chief(args, tracked) as run, multiworker.lost_workers():
        stateful = [
            keras.callbacks.EarlyStopping(
                "val_dice", mode="max", patience=args.patience, restore_best_weights=True, verbose=0
            )
        ]
        if args.lr_schedule == "plateau":
            stateful.append(
                keras.callbacks.ReduceLROnPlateau("val_dice", mode="max", factor=0.5, patience=3)
            )
        saved = checkpoint.Checkpoint(run.folder, stateful)
        multiworker.share_checkpoint(model.distribute_strategy, saved)
        run.log_missing_epochs(saved.history)
        saved.restore(model, train_set, args.epochs)
        if saved.epoch and not saved.finished(args.epochs):
            print(f"resuming after epoch {saved.epoch} (its checkpoint), up to {args.epochs}")
        elif not saved.finished(args.epochs):
            epochs = f"{args.epochs} epoch{'s' if args.epochs > 1 else ''}"
            print(f"training: up to {epochs} (the first also builds the steps)")
        logger = runs.EpochLogger(run, saved, epoch_size(len(x_train), args)[1], args.epochs, unit)
        try:
            model.fit(
                train_set,
                validation_data=None if validation else val_set,
                initial_epoch=saved.epoch,
                epochs=saved.epoch if saved.finished(args.epochs) else args.epochs,
                callbacks=[*validation, divergence.DivergenceGuard(), *stateful, saved, logger],
                shuffle=False,
                verbose=0,
            )
        except divergence.Diverged:
            saved.remove()  # it cannot be resumed: it would diverge again
            raise
        history = {key: [epoch[key] for epoch in saved.history] for key in saved.history[0]}
        results, probabilities, table = evaluate(
            model, x_test, y_test, eval_batch, args.tta, test_cases, args.nsd_tolerance
        )
        results["best_epoch"] = int(np.argmax(history["val_dice"])) + 1
        results["epochs_run"] = len(history["loss"])
        results["fit_seconds"] = saved.state["fit_seconds"]
        pictures = {
            "training_curves.png": figures.training_curves(history, results["best_epoch"]),
            "test_predictions.png": prediction_figure(x_test, y_test, probabilities),
        }
        example = (x_test[:1], probabilities[:1])
        tables = {"test_cases.json": table}
        info = run.log_results(model, results, example, pictures, tables, args.register)
        if info and args.save_model:  # info: the chief's run (the other workers log nothing)
            cli.save_model(model, args.save_model)
    saved.remove()  # the run is FINISHED: all of it is in MLflow
    print_results(run_name, results, len(x_test), args.nsd_tolerance)
    if info is None:
        return results
    where = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id}
    return {**results, **where, "model_uri": info.model_uri, "tracking_seconds": run.seconds}


def print_results(run_name, results, n_test, tolerance=1.0):
    """The final table: test metrics from metrics.py's reference functions; one column per class
    when there are several."""
    print(
        f"\n{run_name}: best epoch {results['best_epoch']} of {results['epochs_run']}, "
        f"fit {results['fit_seconds']:.0f} s"
    )
    classes = sorted({int(key.rpartition("_class")[2]) for key in results if "_class" in key})
    suffixes = ["", *(f"_class{c}" for c in classes)]
    print(
        f"{f'test set ({n_test} examples)':<30}"
        + "".join(f"{s[1:] or 'value':>9}" for s in suffixes)
    )
    for label, key in (
        ("Dice", "test_dice"),
        ("IoU", "test_iou"),
        ("Dice, per-image mean", "test_dice_per_image"),
        ("HD95, cases with both masks", "test_hd95"),
        (f"NSD at {tolerance:g}", "test_nsd"),
        ("cases with one empty mask", "test_one_empty"),
        ("loss", "test_loss"),
    ):
        values = [results[key + s] for s in suffixes if key + s in results]
        print(
            f"{label:<30}"
            + "".join(f"{v:>9}" if isinstance(v, int) else f"{v:>9.4f}" for v in values)
        )
