"""One line, one checkpoint and one MLflow value per metric and epoch: the training's progress.

`EpochLogger` is the last callback of a script's `fit`: at each epoch's end it saves the checkpoint
(checkpoint.py), queues the epoch's values for the store through the run (runs.TrackedRun, whose
outbox sends them: a store that does not answer does not stop training), and prints one line with
the numbers that matter and the time left. `step` = epoch, from 1.
"""

import statistics
import time

import keras

from tp4.tracking import runs

EPOCH_METRICS = ("loss", "dice", "iou", "val_loss", "val_dice", "val_iou")


class EpochLogger(keras.callbacks.Callback):
    """At each epoch's end: saves the checkpoint, then logs loss, dice, iou, their val_ twins, lr
    (the learning rate of the epoch's first step), epoch_seconds and images_per_second (training
    examples per second of training, validation excluded) with step=epoch, and prints one line.
    Saved before logged: an epoch in the store is always in the checkpoint, and --resume logs the
    epochs of the checkpoint the store lacks. Place it last, after the callbacks whose state the
    checkpoint keeps.
    """

    def __init__(self, run: runs.TrackedRun, checkpoint, n_train, epochs, unit="img"):
        super().__init__()
        self.run, self.checkpoint = run, checkpoint
        self.n_train, self.epochs, self.unit = n_train, epochs, unit
        self.durations = []  # of this process's epochs, for the time left

    def on_train_begin(self, logs=None):
        self.run.log_missing_epochs(self.checkpoint.history)  # those a kill kept from the store

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.train_end = time.perf_counter(), None
        # The rate the epoch starts with: read at its end, it would be the next epoch's (the
        # schedule has moved on, ReduceLROnPlateau has acted).
        self.learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_test_begin(self, logs=None):
        self.train_end = self.train_end or time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        values = {key: float(logs[key]) for key in EPOCH_METRICS if key in logs}
        values["lr"] = self.learning_rate
        values["epoch_seconds"] = now - self.start
        values["images_per_second"] = self.n_train / ((self.train_end or now) - self.start)
        self.checkpoint.save(epoch + 1, values)
        self.run.log_metrics(values, step=epoch + 1)
        shown = "  ".join(f"{key} {values[key]:.4f}" for key in EPOCH_METRICS if key in values)
        self.durations.append(values["epoch_seconds"])
        print(
            f"epoch {epoch + 1:>3}/{self.epochs}  {shown}  lr {values['lr']:.1e}  "
            f"{values['epoch_seconds']:.1f}s  {values['images_per_second']:.1f} {self.unit}/s  "
            f"{time_left(self.durations, self.epochs - epoch - 1)}",
            flush=True,
        )


def time_left(durations, epochs_left):
    """The time `epochs_left` take at the median epoch's pace, as "2m05s left" (the first epoch,
    which compiles, counts only when it is the only one); early stopping may end sooner."""
    typical = statistics.median(durations[1:] or durations)
    seconds = round(typical * epochs_left)
    return f"{seconds // 60}m{seconds % 60:02d}s left" if epochs_left else "done"
