"""One training step of a tiny U-Net on one device, then on 2 replicas (2 logical CPU devices),
from the same weights and data; prints what tests/test_distribute.py compares, as JSON.

Run as its own process: the CPU is split into logical devices before TensorFlow starts them.
"""

import argparse
import json
import sys

import keras
import numpy as np
import tensorflow as tf

import data
import losses
import metrics
import unet
from tp4.distributed import distribute
from tp4.models import batchnorm


def one_step(strategy, weights, loss, batch_norm, splits):
    """fit for one step of the 8 training images (one global batch) and one validation pass; returns
    the model and the epoch's logs."""
    (x_train, y_train), (x_val, y_val) = splits
    with strategy.scope():
        model = unet.build_unet((16, 16, 1), 4, 2, batch_norm=batchnorm.layer(batch_norm))
        model.set_weights(weights)
        model.compile(
            keras.optimizers.SGD(0.1),  # Adam's first step would hide a gradient's scale
            losses.get_loss(loss),
            metrics=[losses.DiceMetric(), losses.IoUMetric()],
        )
    replicas = strategy.num_replicas_in_sync
    train_set = data.make_dataset(x_train, y_train, 8, drop_remainder=True)
    if replicas == 1:  # Keras' own validation, as on one device
        history = model.fit(
            train_set, validation_data=data.make_dataset(x_val, y_val, 4), verbose=0
        )
    else:  # 5 validation images in batches of 4: the last one is partial
        history = model.fit(
            train_set, callbacks=[distribute.Validation(x_val, y_val, 4)], verbose=0
        )
    return model, {key: values[0] for key, values in history.history.items()}


def main():
    two = distribute.strategy(argparse.Namespace(strategy="mirrored", devices=2))
    cpu = tf.distribute.OneDeviceStrategy("/cpu:0")  # the same kernels as the 2 CPU devices
    images, masks = data.make_synthetic_2d(13, 16, seed=3, foreground=0.2)
    splits = (images[:8], masks[:8]), (images[8:], masks[8:])
    keras.utils.set_random_seed(0)
    synchronized = batchnorm.layer("synchronized")
    start = unet.build_unet((16, 16, 1), 4, 2, batch_norm=synchronized).get_weights()
    report = {"replicas": two.num_replicas_in_sync}
    for loss, batch_norm in (
        ("bce_dice", "synchronized"),
        ("generalized_dice", "synchronized"),
        ("bce_dice", "keras"),  # statistics of each replica's half-batch
    ):
        one_model, one = one_step(cpu, start, loss, batch_norm, splits)
        two_model, two_logs = one_step(two, start, loss, batch_norm, splits)
        probabilities = one_model.predict(images[8:], verbose=0)
        report[f"{loss} {batch_norm}"] = {
            "one": one,
            "two": two_logs,
            "weights": max(
                float(np.abs(a - b).max())
                for a, b in zip(one_model.get_weights(), two_model.get_weights())
            ),
            "moved": max(
                float(np.abs(a - b).max()) for a, b in zip(one_model.get_weights(), start)
            ),
            "val_dice": metrics.dice_coefficient(masks[8:], probabilities >= 0.5),
            "val_iou": metrics.iou_score(masks[8:], probabilities >= 0.5),
            "predict": float(
                np.abs(distribute.predict(two_model, images[8:], 4) - probabilities).max()
            ),
        }
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
