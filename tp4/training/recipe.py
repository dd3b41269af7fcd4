"""The training recipe shared by train.py (2D) and conv3d.py (3D): the pieces the scripts assemble.

What this module teaches:
- a segmentation recipe: BCE + Dice loss, Adam, cosine learning-rate decay, flips and 90-degree
  rotations, the output bias at the lesion prior, early stopping on validation Dice with the best
  weights restored (`stopping`);
- honest evaluation: the final numbers come from a held-out test set never used for early
  stopping, computed case by case with metrics.py's exact reference functions (evaluation.py:
  Dice, IoU, HD95, NSD, per class), optionally with test-time mirroring (`--tta`);
- a run's name says what it is, as the TP asks: `{Architecture}_{Loss}_{Optimizer}` (`run_name`);
  the data it trained on is the run's MLflow dataset, not part of its name.

The scripts call these from their own training function: data, model, `compile`, the MLflow run,
`fit`, evaluation, logging, in that order.
"""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import keras
import numpy as np

import data
import losses
import unet
from tp4.distributed import distribute, multiworker
from tp4.images import geometry
from tp4.perf import speed
from tp4.training import evaluation


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
EVAL_BATCH_FACTOR = 4  # validation and test batches, in training batches


def run_name(model: keras.Model, config) -> str:
    """`{Architecture}_{Loss}_{Optimizer}` (UNet_DiceLoss_Adam), or --run-name."""
    loss, optimizer = losses.LOSSES[config.loss].label, OPTIMIZERS[config.optimizer].label
    return config.run_name or f"{model.name}_{loss}_{optimizer}"


def peak_learning_rate(config) -> float:
    """--lr, or the optimizer's usual learning rate."""
    return config.lr if config.lr is not None else OPTIMIZERS[config.optimizer].learning_rate


def loss(config, model: keras.Model) -> keras.losses.Loss:
    """The training loss (--loss); with deep supervision, at every head of `model`
    (losses.DeepSupervisionLoss, nnU-Net's weights)."""
    chosen, heads = losses.get_loss(config.loss), unet.heads(model)
    return losses.DeepSupervisionLoss(chosen, heads) if heads > 1 else chosen


def inference_model(model: keras.Model) -> keras.Model:
    """The trained `model` as it is evaluated, logged and saved: deep supervision's extra heads
    dropped (unet.inference_model). Such a model is not compiled (a fresh optimizer saved with it
    would not match its weights when loaded): it carries the loss of its one output for `evaluate`.
    """
    inference = unet.inference_model(model)
    if inference is not model:
        inference.loss = model.loss.loss
    return inference


def choose_speed(config, build: Callable[[], keras.Model]):
    """`config` with its precision and XLA setting resolved for this machine (speed.decide: `auto`
    by the hardware's rules, measured on the model `build()` makes at the batch size where they
    cannot decide, and cached), why (`speed_choice`, for the run's tag) and its replicas set.
    Call it before seeding. Under a strategy: XLA off, the precision measured on one replica (the
    chief's choice for all)."""
    config = distribute.with_replicas(config)
    xla = "off" if config.strategy != "none" else config.xla
    (precision, xla), why = multiworker.from_chief(
        distribute.strategy(config),
        lambda: speed.decide(config.precision, xla, build, config.batch_size),
    )
    return dataclasses.replace(config, precision=precision, xla=xla, speed_choice=why)


def epoch_size(n_train: int, config) -> tuple[int, int]:
    """(batches, examples) of one training epoch. With XLA, full batches only: XLA compiles one
    program per batch shape, and a partial last batch would cost a second compile of the training
    step for a few images. With several replicas too: each has its share of every batch. The
    reshuffle at every epoch changes which images wait for the next one."""
    batch = distribute.global_batch(config)
    if not (config.xla or config.replicas > 1):
        return -(-n_train // batch), n_train
    if n_train < batch:
        replicas = f" x {config.replicas} replicas" if config.replicas > 1 else ""
        raise ValueError(
            f"--batch-size {config.batch_size}{replicas} is larger than the {n_train} training "
            "examples"
        )
    batches = n_train // batch
    return batches, batches * batch


def optimizer(config, n_train: int) -> keras.optimizers.Optimizer:
    """The optimizer at its peak learning rate, decayed by a cosine over --epochs of `n_train`
    examples if that is the schedule."""
    peak = peak_learning_rate(config)
    if config.lr_schedule == "cosine":
        steps = config.epochs * epoch_size(n_train, config)[0]
        peak = keras.optimizers.schedules.CosineDecay(peak, decay_steps=steps, alpha=0.01)
    return OPTIMIZERS[config.optimizer].make(peak)


def prior_bias(config, masks: np.ndarray, num_classes: int = 2) -> float | list[float]:
    """Initial output bias from the training masks: the logit of the foreground fraction (a sigmoid
    output), the log of each class's fraction (a list, background first: a softmax output, since
    softmax(log f) = f), or 0 with --output-bias zero."""
    prior = config.output_bias == "prior"
    if num_classes > 2:
        fractions = [np.mean(masks == c) for c in range(num_classes)]
        return [float(np.log(max(f, 1e-6))) if prior else 0.0 for f in fractions]
    foreground = float(masks.mean())
    if prior and 0 < foreground < 1:
        return float(np.log(foreground / (1 - foreground)))
    return 0.0


def datasets(config, splits: dict):
    """(training set, validation set, evaluation batch): the tf.data pipelines of the splits."""
    (x_train, y_train), (x_val, y_val) = splits["train"], splits["val"]
    full_batches = bool(config.xla) or config.replicas > 1  # as epoch_size
    train_set = data.make_dataset(
        x_train,
        y_train,
        distribute.global_batch(config),
        training=True,
        augment=not config.no_augment,
        seed=config.seed,
        drop_remainder=full_batches,
    )
    # Evaluation keeps no activations for a backward pass, so larger batches fit: fewer calls, and
    # fewer batch shapes for XLA to compile (30 validation images: one batch instead of four).
    eval_batch = EVAL_BATCH_FACTOR * distribute.global_batch(config)
    if config.replicas > 1:  # validated by distribute.Validation, over every example
        return train_set, None, eval_batch
    return train_set, data.make_dataset(x_val, y_val, eval_batch), eval_batch


def stopping(config) -> list[keras.callbacks.Callback]:
    """Early stopping on validation Dice with the best weights restored, and the plateau schedule
    if it is --lr-schedule's: the callbacks whose state the checkpoint keeps."""
    callbacks = [
        keras.callbacks.EarlyStopping(
            "val_dice", mode="max", patience=config.patience, restore_best_weights=True, verbose=0
        )
    ]
    if config.lr_schedule == "plateau":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau("val_dice", mode="max", factor=0.5, patience=3)
        )
    return callbacks


def params(config) -> dict[str, object]:
    """The recipe as flat MLflow params."""
    return {
        "optimizer": OPTIMIZERS[config.optimizer].label,
        "learning_rate": peak_learning_rate(config),
        "lr_schedule": config.lr_schedule,
        "loss": losses.LOSSES[config.loss].label,
        "batch_size": config.batch_size,
        **distribute.params(config),
        "epochs": config.epochs,
        "patience": config.patience,
        "augment": not config.no_augment,
        "seed": config.seed,
        "precision": config.precision,
        "xla": config.xla,
        "tta": config.tta,
        "nsd_tolerance": config.nsd_tolerance,
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


def fit_results(history: list[dict[str, float]], fit_seconds: float) -> dict[str, float]:
    """best_epoch (of validation Dice, from 1), epochs_run and fit_seconds of a training."""
    return {
        "best_epoch": int(np.argmax([epoch["val_dice"] for epoch in history])) + 1,
        "epochs_run": len(history),
        "fit_seconds": fit_seconds,
    }


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
