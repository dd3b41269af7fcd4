"""Divergence caught as it happens: a run that blows up stops at once and is FAILED, never FINISHED.

What this module teaches: a loss can blow up without becoming NaN. Keras computes the binary
cross-entropy of a sigmoid output from the logits underneath (exact, no clipping), so a network
whose weights have exploded gives a huge but finite loss (1e11 with Adam at --lr 10, on logits of
1e11) while predicting 0 or 1 with certainty everywhere. Every loss here starts near 1 (the
cross-entropy of the prior is below ln 2, a Dice loss at most 1): a training loss above LOSS_LIMIT
means logits a hundred units on the wrong side on average, a network that has diverged. So the
guard stops on a training loss that is not finite or above LOSS_LIMIT (checked at every batch), a
validation loss that is not finite, or weights (batch-norm statistics included) that are not finite
(checked at every epoch's end, before the checkpoint is written).
"""

import math

import keras
import numpy as np

LOSS_LIMIT = 100.0
DIVERGED = "training diverged"  # how the message, and the FAILED run's `failure` tag, begin


class Diverged(ValueError):
    """The training diverged: a one-line message, and the run is FAILED."""


class DivergenceGuard(keras.callbacks.Callback):
    """Raises Diverged as soon as the loss or the weights show that training has blown up, after
    deleting the run's checkpoint (`checkpoint.remove()`: resumed, it would diverge again). Put it
    first among the callbacks: nothing else sees the diverged epoch."""

    def __init__(self, checkpoint=None):
        super().__init__()
        self.checkpoint = checkpoint

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        loss = float(logs["loss"])
        if not loss <= LOSS_LIMIT:  # NaN too
            self._stop(f"loss {loss:.3g}")

    def on_epoch_end(self, epoch, logs=None):
        val_loss = float(logs.get("val_loss", 0.0))
        if not math.isfinite(val_loss):
            self._stop(f"val_loss {val_loss:.3g}")
        if not all(np.isfinite(w).all() for w in self.model.get_weights()):
            self._stop("weights not finite")

    def _stop(self, what):
        if self.checkpoint is not None:
            self.checkpoint.remove()
        raise Diverged(f"{DIVERGED} at epoch {self.epoch} ({what}); try a lower --lr")
