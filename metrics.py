"""Exercise 2.2: Dice and IoU, exactly, and the losses that train segmentation networks.

What this script teaches:
- Dice = 2|A∩B| / (|A|+|B|) and IoU = |A∩B| / |A∪B| on binary masks, with both related by
  Dice = 2·IoU / (1 + IoU): Dice is never below IoU, and they rank predictions identically;
- the empty cases are decided, not smoothed away: both masks empty -> 1.0, exactly one empty -> 0.0.
  A `smooth=1` term in the formula is a bug: on a 2x2 mask it turns a Dice of 0.8 into 0.83;
- a global value (all pixels of all images pooled) differs from a per-image mean (MONAI's
  convention): one missed small lesion barely moves the first and costs a whole image in the second;
- Keras metrics that accumulate TP/FP/FN over the epoch, so the epoch value is the dataset value,
  not a mean of batch values; and the losses: soft Dice, BCE + Dice, Tversky, focal Tversky,
  Generalized Dice.

    python metrics.py   # worked cases, Dice vs IoU table, identity check, scikit-learn cross-check
"""

from collections.abc import Callable
from typing import NamedTuple

import keras
import numpy as np
from keras import ops
from sklearn.metrics import f1_score, jaccard_score

EPSILON = 1e-6  # keeps soft losses finite on empty batches; negligible against any real pixel count


# ------------------------------------------------------------------------------------------------
# Reference NumPy metrics: exact counts on binarized masks.


def confusion_counts(y_true, y_pred, threshold=0.5, per_image=False):
    """(TP, FP, FN) pixel counts; predictions >= threshold count as foreground. Per image: arrays
    over axis 0."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shape mismatch: y_true {y_true.shape} vs y_pred {y_pred.shape}")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must be a binary mask of 0s and 1s")
    truth, pred = y_true.astype(bool), y_pred >= threshold
    axis = tuple(range(1, truth.ndim)) if per_image else None
    if per_image and truth.ndim < 2:
        raise ValueError("per_image=True needs a batch axis first, e.g. (N, H, W) or (N, H, W, 1)")
    return (
        np.sum(truth & pred, axis=axis),
        np.sum(~truth & pred, axis=axis),
        np.sum(truth & ~pred, axis=axis),
    )


def _ratio(numerator, denominator):
    """numerator / denominator, and 1.0 where the denominator is 0 (both masks empty: a perfect
    answer)."""
    numerator, denominator = np.asarray(numerator, float), np.asarray(denominator, float)
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1), 1.0)


def dice_coefficient(y_true, y_pred, threshold=0.5, per_image=False):
    """Dice = 2TP / (2TP + FP + FN); over all pixels, or the mean per-image values if per_image."""
    tp, fp, fn = confusion_counts(y_true, y_pred, threshold, per_image)
    return float(np.mean(_ratio(2 * tp, 2 * tp + fp + fn)))


def iou_score(y_true, y_pred, threshold=0.5, per_image=False):
    """IoU (Jaccard) = TP / (TP + FP + FN); over all pixels, or the mean of per-image values if
    per_image."""
    tp, fp, fn = confusion_counts(y_true, y_pred, threshold, per_image)
    return float(np.mean(_ratio(tp, tp + fp + fn)))


# ------------------------------------------------------------------------------------------------
# Keras metrics: exact epoch values from counts accumulated over all batches.


class _OverlapMetric(keras.metrics.Metric):
    """Accumulates TP, FP and FN (float64, exact far beyond one epoch of pixels); subclasses define
    result()."""

    def __init__(self, threshold=0.5, name=None, dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.threshold = threshold
        self.counts = self.add_variable(
            shape=(3,), initializer="zeros", dtype="float64", name="tp_fp_fn"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth = ops.cast(y_true > 0.5, "float32")
        pred = ops.cast(y_pred >= self.threshold, "float32")
        tp = ops.sum(truth * pred)
        batch = ops.stack([tp, ops.sum(pred) - tp, ops.sum(truth) - tp])
        self.counts.assign_add(ops.cast(batch, "float64"))

    def reset_state(self):
        self.counts.assign(ops.zeros((3,), dtype="float64"))

    def _ratio(self, numerator, denominator):
        safe = ops.where(denominator > 0, denominator, 1.0)
        return ops.cast(ops.where(denominator > 0, numerator / safe, 1.0), self.dtype)

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}


@keras.saving.register_keras_serializable(package="tp4")
class DiceMetric(_OverlapMetric):
    """Dice over every pixel seen since the last reset (1.0 when both masks are empty)."""

    def __init__(self, threshold=0.5, name="dice", dtype=None):
        super().__init__(threshold, name=name, dtype=dtype)

    def result(self):
        tp, fp, fn = self.counts[0], self.counts[1], self.counts[2]
        return self._ratio(2 * tp, 2 * tp + fp + fn)


@keras.saving.register_keras_serializable(package="tp4")
class IoUMetric(_OverlapMetric):
    """IoU over every pixel seen since the last reset (1.0 when both masks are empty)."""

    def __init__(self, threshold=0.5, name="iou", dtype=None):
        super().__init__(threshold, name=name, dtype=dtype)

    def result(self):
        tp, fp, fn = self.counts[0], self.counts[1], self.counts[2]
        return self._ratio(tp, tp + fp + fn)


# ------------------------------------------------------------------------------------------------
# Losses. Soft counts use probabilities instead of 0/1 so they have gradients. All are computed over
# the whole batch (the "batch Dice" of nnU-Net): an image without lesion then does not produce a 0/0
# of its own.


def _soft_counts(y_true, y_pred, axis=None):
    y_true, y_pred = ops.cast(y_true, y_pred.dtype), ops.convert_to_tensor(y_pred)
    tp = ops.sum(y_true * y_pred, axis=axis)
    return tp, ops.sum(y_pred, axis=axis) - tp, ops.sum(y_true, axis=axis) - tp


class _SegmentationLoss(keras.losses.Loss):
    def __init__(self, name, epsilon=EPSILON, **kwargs):
        super().__init__(name=name, **kwargs)
        self.epsilon = epsilon

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="tp4")
class SoftDiceLoss(_SegmentationLoss):
    """1 - soft Dice: 1 - (2·Σyp + ε) / (Σy + Σp + ε)."""

    def __init__(self, name="dice_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        tp, fp, fn = _soft_counts(y_true, y_pred)
        return 1.0 - (2 * tp + self.epsilon) / (2 * tp + fp + fn + self.epsilon)


@keras.saving.register_keras_serializable(package="tp4")
class BCEDiceLoss(SoftDiceLoss):
    """Binary cross-entropy (per pixel, smooth gradients) + soft Dice (overlap, imbalance-proof)."""

    def __init__(self, bce_weight=1.0, dice_weight=1.0, name="bce_dice_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.bce_weight, self.dice_weight = bce_weight, dice_weight

    def call(self, y_true, y_pred):
        bce = ops.mean(keras.losses.binary_crossentropy(ops.cast(y_true, y_pred.dtype), y_pred))
        return self.bce_weight * bce + self.dice_weight * super().call(y_true, y_pred)

    def get_config(self):
        return {
            **super().get_config(),
            "bce_weight": self.bce_weight,
            "dice_weight": self.dice_weight,
        }


@keras.saving.register_keras_serializable(package="tp4")
class TverskyLoss(_SegmentationLoss):
    """1 - TP / (TP + α·FP + β·FN) (Salehi et al. 2017). β > α costs a missed lesion pixel more than
    a false alarm, which pushes recall up on small lesions; α = β = 0.5 is the soft Dice loss."""

    def __init__(self, alpha=0.3, beta=0.7, name="tversky_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.alpha, self.beta = alpha, beta

    def tversky_index(self, y_true, y_pred):
        tp, fp, fn = _soft_counts(y_true, y_pred)
        return (tp + self.epsilon) / (tp + self.alpha * fp + self.beta * fn + self.epsilon)

    def call(self, y_true, y_pred):
        return 1.0 - self.tversky_index(y_true, y_pred)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta}


@keras.saving.register_keras_serializable(package="tp4")
class FocalTverskyLoss(TverskyLoss):
    """(1 - Tversky index) ** (1/γ) (Abraham & Khan 2019, γ = 4/3): flattens the loss near a perfect
    overlap, so training keeps its focus on the images that are still badly segmented."""

    def __init__(self, alpha=0.3, beta=0.7, gamma=4 / 3, name="focal_tversky_loss", **kwargs):
        super().__init__(alpha, beta, name=name, **kwargs)
        self.gamma = gamma

    def call(self, y_true, y_pred):
        # The clip keeps the gradient of x ** (1/γ) finite at a perfect overlap (x = 0).
        return ops.power(ops.maximum(super().call(y_true, y_pred), self.epsilon), 1.0 / self.gamma)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma}


@keras.saving.register_keras_serializable(package="tp4")
class GeneralizedDiceLoss(_SegmentationLoss):
    """Generalized Dice (Sudre et al. 2017): each class weighted by 1 / (its volume)², so a small
    lesion weighs as much as the large background. A single sigmoid channel is treated as two
    classes (lesion, background)."""

    def __init__(self, name="generalized_dice_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        if y_pred.shape[-1] == 1:
            y_true, y_pred = (
                ops.concatenate([y_true, 1 - y_true], -1),
                ops.concatenate([y_pred, 1 - y_pred], -1),
            )
        class_axes = tuple(range(len(y_pred.shape) - 1))
        tp, fp, fn = _soft_counts(y_true, y_pred, axis=class_axes)
        volume = tp + fn
        # A class absent from the batch would get an infinite weight: give it the largest finite one
        # (as MONAI).
        weight = ops.where(volume > 0, 1.0 / ops.maximum(volume, 1.0) ** 2, 0.0)
        weight = ops.stop_gradient(ops.where(volume > 0, weight, ops.max(weight)))
        overlap = ops.sum(weight * 2 * tp)
        total = ops.sum(weight * (2 * tp + fp + fn))
        return 1.0 - (overlap + self.epsilon) / (total + self.epsilon)


class LossChoice(NamedTuple):
    """A loss on the command line: its display name (MLflow param, run names) and its class."""

    label: str
    make: Callable[[], keras.losses.Loss]


LOSSES = {
    "bce": LossChoice("BCELoss", keras.losses.BinaryCrossentropy),
    "dice": LossChoice("DiceLoss", SoftDiceLoss),
    "bce_dice": LossChoice("CombinedLoss", BCEDiceLoss),
    "tversky": LossChoice("TverskyLoss", TverskyLoss),
    "focal_tversky": LossChoice("FocalTverskyLoss", FocalTverskyLoss),
    "generalized_dice": LossChoice("GeneralizedDiceLoss", GeneralizedDiceLoss),
}


def get_loss(name):
    """A fresh loss object from its command-line name (see LOSSES)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name].make()


def main():
    print(__doc__.split("\n\n")[0], "\n")
    square = np.zeros((64, 64), dtype=np.uint8)
    square[16:48, 16:48] = 1
    half = np.zeros_like(square)
    half[16:48, 16:32] = 1
    empty = np.zeros_like(square)
    cases = {
        "perfect prediction": (square, square),
        "shifted by 4 pixels": (square, np.roll(square, 4, axis=1)),
        "shifted by 16 pixels": (square, np.roll(square, 16, axis=1)),
        "half the lesion found": (square, half),
        "twice too large": (half, square),
        "missed completely": (square, empty),
        "false alarm on empty": (empty, square),
        "both empty": (empty, empty),
    }
    print(f"{'case':<24}{'Dice':>8}{'IoU':>8}{'2·IoU/(1+IoU)':>16}")
    for label, (truth, pred) in cases.items():
        dice, iou = dice_coefficient(truth, pred), iou_score(truth, pred)
        print(f"{label:<24}{dice:>8.4f}{iou:>8.4f}{2 * iou / (1 + iou):>16.4f}")

    rng = np.random.default_rng(0)
    truth = (rng.random((200, 32, 32)) < rng.uniform(0.02, 0.5, (200, 1, 1))).astype(np.uint8)
    probabilities = np.clip(truth + rng.normal(0, 0.45, truth.shape), 0, 1)
    dice, iou = dice_coefficient(truth, probabilities), iou_score(truth, probabilities)
    flat_true, flat_pred = truth.ravel(), (probabilities >= 0.5).ravel()
    print("\n200 random 32x32 masks with noisy predictions:")
    print(f"  Dice {dice:.6f}   scikit-learn f1_score      {f1_score(flat_true, flat_pred):.6f}")
    print(
        f"  IoU  {iou:.6f}   scikit-learn jaccard_score {jaccard_score(flat_true, flat_pred):.6f}"
    )
    print(f"  identity: |Dice - 2·IoU/(1+IoU)| = {abs(dice - 2 * iou / (1 + iou)):.2e}")
    print(
        f"  per-image mean Dice {dice_coefficient(truth, probabilities, per_image=True):.6f} "
        f"(global {dice:.6f}: small masks weigh more per image)"
    )


if __name__ == "__main__":
    main()
