"""Data-parallel training on tf.distribute: the GPUs of one machine, or several machines.

What this module teaches:
- data parallelism: every replica holds the whole model and trains on its share of each batch; the
  gradients are summed over the replicas before every update, so the replicas stay identical. For
  the result to be the one of a single device at the same global batch, what is computed over the
  batch must be computed over the whole of it: the batch losses (losses.whole_batch: each replica
  adds the others' counts) and the batch-norm statistics (Keras' BatchNormalization with
  `synchronized=True`: TensorFlow's fused kernel has no cross-replica statistics);
- `--strategy mirrored`: MirroredStrategy over every GPU of the machine, or over `--devices N`
  logical devices of the CPU (to try it without GPUs: they share the same cores, nothing is faster);
- `--strategy multiworker`: MultiWorkerMirroredStrategy over processes, on one machine or several,
  described by TF_CONFIG; the chief alone talks to MLflow (multiworker.py). Keras needs a patch for
  it (keras_multiworker.py);
- under a strategy: --batch-size is per replica (the global batch is --batch-size x replicas),
  epochs are made of full global batches (each replica always has a share), the validation and
  test sets are predicted in full batches too and scored over every example (`predict`,
  `Validation`), XLA is off (a compiled step cannot reach variables on other devices), and the
  precision is chosen on one replica (recipe.choose_speed).
"""

import argparse
import contextlib
import dataclasses
import functools
from typing import Literal, get_args

import keras
import numpy as np
import tensorflow as tf

import losses
import unet
from tp4.distributed import keras_multiworker, multiworker
from tp4.models import batchnorm

Strategy = Literal["none", "mirrored", "multiworker"]
STRATEGIES = get_args(Strategy)


def check_arguments(
    parser: argparse.ArgumentParser, args, xla_flags: tuple[str, ...] = ("xla",)
) -> None:
    """Refuse (parser.error) what a strategy cannot take: --devices without mirrored, XLA on."""
    if args.devices is not None and (args.strategy != "mirrored" or args.devices < 1):
        parser.error("--devices N (N >= 1) goes with --strategy mirrored")
    for flag in xla_flags:
        if args.strategy != "none" and getattr(args, flag) == "on":
            parser.error(
                f"--{flag.replace('_', '-')} on: XLA cannot compile steps whose variables live on "
                "several devices; leave it at auto (off under a strategy)"
            )


@functools.cache
def _strategy(kind, devices):
    if kind == "none":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy(_logical_cpus(devices) if devices else None)
    multiworker.task()  # a clear error if TF_CONFIG is missing or wrong
    keras_multiworker.patch()
    return tf.distribute.MultiWorkerMirroredStrategy()


def _logical_cpus(count):
    """Split the CPU into `count` logical devices; TensorFlow must not have started them yet."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count
        )
    except RuntimeError:  # already started: fine if it has them
        started = len(tf.config.list_logical_devices("CPU"))
        if started < count:
            raise ValueError(
                f"--devices {count}: TensorFlow has already started with {started} CPU device(s)"
            ) from None
    return [f"/cpu:{i}" for i in range(count)]


def strategy(args) -> tf.distribute.Strategy:
    """The process's strategy for --strategy/--devices (made once: TensorFlow's devices and
    collectives are set up once per process); TensorFlow's default one for `none`."""
    return _strategy(args.strategy, args.devices)


def setup(config):
    """Start the strategy (before anything else starts TensorFlow: --devices splits the CPU first),
    and return the configuration to run: under multiworker, every worker takes the chief's (the same
    run, --resume included, whatever the other workers were given besides --strategy), and the
    others follow it (multiworker.follow)."""
    started = strategy(config)
    if config.strategy != "multiworker":
        return config
    config = type(config).from_json(multiworker.from_chief(started, config.to_json))
    return config if multiworker.is_chief(config) else multiworker.follow(config)


def is_chief(config) -> bool:
    """Whether this process talks to MLflow: always, but under multiworker only the chief."""
    return config.strategy != "multiworker" or multiworker.is_chief(config)


def lost_workers(config):
    """Under multiworker, a worker that stops is one line (multiworker.lost_workers); elsewhere
    nothing."""
    return (
        multiworker.lost_workers() if config.strategy == "multiworker" else contextlib.nullcontext()
    )


def validation(config, split: tuple[np.ndarray, np.ndarray], batch: int) -> list:
    """The validation callback under several replicas (`Validation`), none on one device (fit's
    own validation_data does it)."""
    return [Validation(*split, batch)] if config.replicas > 1 else []


def wait_for_the_chief(args) -> None:
    """Under multiworker, every worker waits here until the chief has ended its runs: TensorFlow
    reports a worker that leaves first as crashed."""
    if args.strategy == "multiworker":
        multiworker.from_chief(strategy(args), lambda: None)


def with_replicas(config):
    """`config` with `replicas` set from the strategy; a resumed run must keep its number."""
    replicas = strategy(config).num_replicas_in_sync
    if config.resume and config.replicas != replicas:
        raise ValueError(
            f"run {config.resume} trained on {config.replicas} replicas and would continue on "
            f"{replicas}: resume it with as many (GPUs, --devices, or TF_CONFIG's workers)"
        )
    return dataclasses.replace(config, replicas=replicas)


def batch_norm(args):
    """unet.build_unet's batch_norm: the fused kernel, or statistics over every replica's examples
    under a strategy."""
    return batchnorm.layer("fused" if args.strategy == "none" else "synchronized")


def global_batch(args) -> int:
    """Examples per step: --batch-size on each replica."""
    return args.batch_size * args.replicas


def params(args) -> dict[str, object]:
    """strategy, replicas and global_batch_size, for MLflow."""
    return {
        "strategy": args.strategy,
        "replicas": args.replicas,
        "global_batch_size": global_batch(args),
    }


def describe(args) -> str:
    """', mirrored on 2 replicas, global batch 16' (empty without a strategy)."""
    if args.strategy == "none":
        return ""
    return f", {args.strategy} on {args.replicas} replicas, global batch {global_batch(args)}"


# ------------------------------------------------------------------------------------------------
# Evaluation over every example: full batches only, whatever the number of examples.


def predict(model: keras.Model, images: np.ndarray, batch: int) -> np.ndarray:
    """`model.predict(images)` in batches of `batch` (a multiple of the replicas). Under a strategy,
    the last batch is padded to a full one, and the padding's outputs dropped: TensorFlow splits a
    partial batch unevenly over the replicas and can leave one without any example, and an empty
    batch is what TensorFlow 2.21's oneDNN convolution (CPU) gets wrong (its output keeps the
    input's channels)."""
    count = len(images)
    if model.distribute_strategy.num_replicas_in_sync == 1:
        return model.predict(images, batch_size=batch, verbose=0)
    padding = np.zeros((-count % batch, *images.shape[1:]), images.dtype)
    batches = tf.data.Dataset.from_tensor_slices(np.concatenate([images, padding])).batch(batch)
    options = tf.data.Options()  # each worker its share of every batch, as data.make_dataset
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return model.predict(batches.with_options(options), verbose=0)[:count]


class Validation(keras.callbacks.Callback):
    """Under a strategy of several replicas, in place of fit's own validation (which splits partial
    batches: `predict`): val_loss, val_dice and val_iou at each epoch's end, computed from the
    predictions of every validation example as Keras' evaluate does on one device (the loss of each
    batch, weighted by its size; Dice and IoU over all pixels). Put it first: the other callbacks
    read them."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, batch: int):
        super().__init__()
        self.images, self.masks, self.batch = images, masks, batch

    def on_epoch_end(self, epoch, logs=None):
        probabilities = predict(self.model, self.images, self.batch)
        overlaps = losses.overlap_metrics(self.model, unet.heads(self.model))
        total = 0.0
        for start in range(0, len(self.images), self.batch):
            truth = self.masks[start : start + self.batch]
            batch = probabilities[start : start + self.batch]
            total += float(self.model.loss(truth, batch)) * len(truth)
            for metric in overlaps:
                metric.update_state(truth, batch)
        logs["val_loss"] = total / len(self.images)
        logs.update({f"val_{metric.name}": float(metric.result()) for metric in overlaps})
