"""Exercise 2.2, the Keras side: epoch metrics that give the dataset's Dice, and training losses.

What this module teaches:
- Keras metrics that accumulate TP/FP/FN over the epoch, so the epoch value is the dataset value,
  not a mean of batch values (metrics.py holds the exact NumPy reference they are tested against);
- the losses of segmentation: soft Dice, cross-entropy + Dice, Tversky, focal Tversky, Generalized
  Dice. Soft counts use probabilities instead of 0/1 so they have gradients;
- one convention for two and more classes. The truth is a label map (N, ..., 1) of values 0..C-1;
  the output is one sigmoid channel (2 classes: the probability of the foreground) or C softmax
  channels. Dice-type losses and metrics are the mean over the foreground classes (background, the
  largest class, would otherwise dominate them); cross-entropy is over every class;
- deep supervision (nnU-Net): the same loss at each decoder level against the masks down-sampled to
  match, weighted 1, 1/2, 1/4, ... (`DeepSupervisionLoss`).

Classes are registered under the package "tp4": a saved model reloads wherever this module is
imported (predict.py does), whatever the module was called when it was saved.
"""

from collections.abc import Callable
from typing import NamedTuple

import keras
import tensorflow as tf
from keras import ops
from numpy.typing import ArrayLike

Tensor = ArrayLike  # a backend tensor (TensorFlow here) or a NumPy array
EPSILON = 1e-6  # keeps soft losses finite on empty batches; negligible against any real pixel count


def _one_hot(labels, classes, dtype):
    """One-hot channels (N, ..., C) of a label map (N, ..., 1)."""
    return ops.one_hot(ops.cast(labels[..., 0], "int32"), classes, dtype=dtype)


def class_channels(y_true: Tensor, y_pred: Tensor) -> tuple[Tensor, Tensor]:
    """One channel per class for the truth and the prediction, background first.

    Args:
        y_true: label map (N, ..., 1) of values 0..C-1.
        y_pred: (N, ..., 1) sigmoid or (N, ..., C) softmax probabilities.

    Returns:
        (one-hot truth, probabilities), both (N, ..., C): a sigmoid output counts as two classes
        (background 1 - p, foreground p).
    """
    if y_pred.shape[-1] == 1:
        truth = ops.cast(y_true, y_pred.dtype)
        return ops.concatenate([1 - truth, truth], -1), ops.concatenate([1 - y_pred, y_pred], -1)
    return _one_hot(y_true, y_pred.shape[-1], y_pred.dtype), y_pred


def foreground_channels(y_true: Tensor, y_pred: Tensor) -> tuple[Tensor, Tensor]:
    """The truth and the prediction of the foreground classes only.

    Args: as `class_channels`.

    Returns:
        (truth, probabilities), both (N, ..., C-1): the sigmoid channel as it is, or the softmax
        channels 1..C-1 with a one-hot truth.
    """
    if y_pred.shape[-1] == 1:
        return ops.cast(y_true, y_pred.dtype), y_pred
    truth, probabilities = class_channels(y_true, y_pred)
    return truth[..., 1:], probabilities[..., 1:]


# ------------------------------------------------------------------------------------------------
# Keras metrics: exact epoch values from counts accumulated over all batches.


class _OverlapMetric(keras.metrics.Metric):
    """Accumulates TP, FP and FN per foreground class (float64, exact far beyond one epoch of
    pixels). Subclasses define ratio(tp, fp, fn) -> (numerator, denominator) per class; the
    result is its mean over the classes."""

    def __init__(self, threshold=0.5, num_classes=2, name=None, dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.threshold, self.num_classes = threshold, num_classes
        self.counts = self.add_variable(
            shape=(3, num_classes - 1), initializer="zeros", dtype="float64", name="tp_fp_fn"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        # The full-resolution output only, where heads are packed behind it (deep supervision).
        y_pred = y_pred[..., : 1 if self.num_classes == 2 else self.num_classes]
        if self.num_classes == 2:  # one sigmoid channel, thresholded
            truth = ops.cast(y_true > 0.5, "float32")
            pred = ops.cast(y_pred >= self.threshold, "float32")
        else:  # softmax: the most probable class, against the labels
            truth = _one_hot(y_true, self.num_classes, "float32")[..., 1:]
            pred = ops.one_hot(ops.argmax(y_pred, axis=-1), self.num_classes)[..., 1:]
        axes = tuple(range(len(pred.shape) - 1))
        tp = ops.sum(truth * pred, axis=axes)
        batch = ops.stack([tp, ops.sum(pred, axis=axes) - tp, ops.sum(truth, axis=axes) - tp])
        self.counts.assign_add(ops.cast(batch, "float64"))

    def reset_state(self):
        self.counts.assign(ops.zeros(self.counts.shape, dtype="float64"))

    def result(self):
        numerator, denominator = self.ratio(self.counts[0], self.counts[1], self.counts[2])
        safe = ops.where(denominator > 0, denominator, 1.0)
        per_class = ops.where(denominator > 0, numerator / safe, 1.0)  # both empty: 1.0
        return ops.cast(ops.mean(per_class), self.dtype)

    def get_config(self):
        config = {"threshold": self.threshold, "num_classes": self.num_classes}
        return {**super().get_config(), **config}


@keras.saving.register_keras_serializable(package="tp4")
class DiceMetric(_OverlapMetric):
    """Dice over every pixel seen since the last reset, mean over the foreground classes (1.0 for a
    class absent from both masks)."""

    def __init__(self, threshold=0.5, num_classes=2, name="dice", dtype=None):
        super().__init__(threshold, num_classes, name=name, dtype=dtype)

    def ratio(self, tp, fp, fn):
        return 2 * tp, 2 * tp + fp + fn


@keras.saving.register_keras_serializable(package="tp4")
class IoUMetric(_OverlapMetric):
    """IoU over every pixel seen since the last reset, mean over the foreground classes (1.0 for a
    class absent from both masks)."""

    def __init__(self, threshold=0.5, num_classes=2, name="iou", dtype=None):
        super().__init__(threshold, num_classes, name=name, dtype=dtype)

    def ratio(self, tp, fp, fn):
        return tp, tp + fp + fn


def overlap_metrics(model: keras.Model, heads: int = 1) -> list[keras.metrics.Metric]:
    """Fresh Dice and IoU epoch metrics for `model`'s output: one sigmoid channel (binary) or a
    softmax over C classes; with `heads` outputs packed along the channels (deep supervision), the
    first one's."""
    classes = max(2, model.output_shape[-1] // heads)
    return [DiceMetric(num_classes=classes), IoUMetric(num_classes=classes)]


# ------------------------------------------------------------------------------------------------
# Losses. Counts are summed over the whole batch (the "batch Dice" of nnU-Net): an image without
# lesion then does not produce a 0/0 of its own. One value per foreground class, then their mean.


def whole_batch(sums: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Sums over the whole batch. Under a tf.distribute strategy each replica holds a slice of the
    batch: its sums are added to the other replicas' (an all-reduce, whose gradient is an
    all-reduce too), so that every replica computes the loss of the whole batch, as one device
    would (nnU-Net gathers its batch Dice counts across GPUs alike).

    Args:
        sums: tensors summed over this replica's examples.

    Returns:
        The same sums over every replica's examples (unchanged outside a strategy).
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return sums
    return tuple(context.all_reduce(tf.distribute.ReduceOp.SUM, list(sums)))


def _soft_counts(y_true, y_pred):
    """Soft (TP, FP, FN) over the whole batch, one value per foreground class."""
    truth, pred = foreground_channels(y_true, ops.convert_to_tensor(y_pred))
    axes = tuple(range(len(pred.shape) - 1))
    tp, predicted, actual = whole_batch(
        (ops.sum(truth * pred, axis=axes), ops.sum(pred, axis=axes), ops.sum(truth, axis=axes))
    )
    return tp, predicted - tp, actual - tp


def cross_entropy(y_true: Tensor, y_pred: Tensor) -> Tensor:
    """Mean cross-entropy per pixel over the whole batch, over every class.

    Args: as `class_channels`.

    Returns:
        A scalar: binary cross-entropy for a sigmoid output, categorical for a softmax one.
    """
    if y_pred.shape[-1] == 1:
        per_pixel = keras.losses.binary_crossentropy(ops.cast(y_true, y_pred.dtype), y_pred)
    else:
        per_pixel = keras.losses.sparse_categorical_crossentropy(y_true[..., 0], y_pred)
    total, pixels = whole_batch(
        (ops.sum(per_pixel), ops.cast(ops.size(per_pixel), per_pixel.dtype))
    )
    return total / pixels


class _SegmentationLoss(keras.losses.Loss):
    """A loss of the whole batch (`batch_loss`), returned once per example. Keras averages what a
    loss returns over the examples and, under a tf.distribute strategy, divides it by the number of
    replicas before their gradients are summed: the batch value comes out as itself. A scalar would
    skip that division (Keras reduces vectors only), and 2 replicas would double the loss and the
    gradients."""

    def __init__(self, name, epsilon=EPSILON, **kwargs):
        super().__init__(name=name, **kwargs)
        self.epsilon = epsilon

    def call(self, y_true, y_pred):
        return ops.broadcast_to(self.batch_loss(y_true, y_pred), ops.shape(y_pred)[:1])

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="tp4")
class CrossEntropyLoss(_SegmentationLoss):
    """Cross-entropy alone (binary or categorical from the output's channels)."""

    def __init__(self, name="cross_entropy_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def batch_loss(self, y_true, y_pred):
        return cross_entropy(y_true, y_pred)


@keras.saving.register_keras_serializable(package="tp4")
class SoftDiceLoss(_SegmentationLoss):
    """1 - soft Dice: 1 - (2·Σyp + ε) / (Σy + Σp + ε), mean over the foreground classes."""

    def __init__(self, name="dice_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def batch_loss(self, y_true, y_pred):
        tp, fp, fn = _soft_counts(y_true, y_pred)
        return ops.mean(1.0 - (2 * tp + self.epsilon) / (2 * tp + fp + fn + self.epsilon))


@keras.saving.register_keras_serializable(package="tp4")
class BCEDiceLoss(SoftDiceLoss):
    """Cross-entropy (per pixel, smooth gradients) + soft Dice (overlap, imbalance-proof)."""

    def __init__(self, bce_weight=1.0, dice_weight=1.0, name="bce_dice_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.bce_weight, self.dice_weight = bce_weight, dice_weight

    def batch_loss(self, y_true, y_pred):
        dice = super().batch_loss(y_true, y_pred)
        return self.bce_weight * cross_entropy(y_true, y_pred) + self.dice_weight * dice

    def get_config(self):
        config = {"bce_weight": self.bce_weight, "dice_weight": self.dice_weight}
        return {**super().get_config(), **config}


@keras.saving.register_keras_serializable(package="tp4")
class TverskyLoss(_SegmentationLoss):
    """1 - TP / (TP + α·FP + β·FN) (Salehi et al. 2017), mean over the foreground classes. β > α
    costs a missed lesion pixel more than a false alarm, which pushes recall up on small lesions;
    α = β = 0.5 is the soft Dice loss."""

    def __init__(self, alpha=0.3, beta=0.7, name="tversky_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.alpha, self.beta = alpha, beta

    def tversky_index(self, y_true, y_pred):
        """One index per foreground class."""
        tp, fp, fn = _soft_counts(y_true, y_pred)
        return (tp + self.epsilon) / (tp + self.alpha * fp + self.beta * fn + self.epsilon)

    def batch_loss(self, y_true, y_pred):
        return ops.mean(1.0 - self.tversky_index(y_true, y_pred))

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "beta": self.beta}


@keras.saving.register_keras_serializable(package="tp4")
class FocalTverskyLoss(TverskyLoss):
    """(1 - Tversky index) ** (1/γ) (Abraham & Khan 2019, γ = 4/3), mean over the foreground
    classes: flattens the loss near a perfect overlap, so training keeps its focus on the images
    that are still badly segmented."""

    def __init__(self, alpha=0.3, beta=0.7, gamma=4 / 3, name="focal_tversky_loss", **kwargs):
        super().__init__(alpha, beta, name=name, **kwargs)
        self.gamma = gamma

    def batch_loss(self, y_true, y_pred):
        # The clip keeps the gradient of x ** (1/γ) finite at a perfect overlap (x = 0).
        distance = ops.maximum(1.0 - self.tversky_index(y_true, y_pred), self.epsilon)
        return ops.mean(ops.power(distance, 1.0 / self.gamma))

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma}


@keras.saving.register_keras_serializable(package="tp4")
class GeneralizedDiceLoss(_SegmentationLoss):
    """Generalized Dice (Sudre et al. 2017): each class, background included, weighted by
    1 / (its volume)², so a small lesion weighs as much as the large background."""

    def __init__(self, name="generalized_dice_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def batch_loss(self, y_true, y_pred):
        truth, pred = class_channels(y_true, ops.convert_to_tensor(y_pred))
        axes = tuple(range(len(pred.shape) - 1))
        tp, volume, predicted = whole_batch(
            (ops.sum(truth * pred, axis=axes), ops.sum(truth, axis=axes), ops.sum(pred, axis=axes))
        )
        # A class absent from the batch would get an infinite weight: give it the largest finite one
        # (as MONAI).
        weight = ops.where(volume > 0, 1.0 / ops.maximum(volume, 1.0) ** 2, 0.0)
        weight = ops.stop_gradient(ops.where(volume > 0, weight, ops.max(weight)))
        overlap = ops.sum(weight * 2 * tp)
        total = ops.sum(weight * (volume + predicted))
        return 1.0 - (overlap + self.epsilon) / (total + self.epsilon)


class LossChoice(NamedTuple):
    """A loss on the command line: its display name (MLflow param, run names) and its class."""

    label: str
    make: Callable[[], keras.losses.Loss]


LOSSES = {
    "bce": LossChoice("BCELoss", CrossEntropyLoss),
    "dice": LossChoice("DiceLoss", SoftDiceLoss),
    "bce_dice": LossChoice("CombinedLoss", BCEDiceLoss),
    "tversky": LossChoice("TverskyLoss", TverskyLoss),
    "focal_tversky": LossChoice("FocalTverskyLoss", FocalTverskyLoss),
    "generalized_dice": LossChoice("GeneralizedDiceLoss", GeneralizedDiceLoss),
}


def get_loss(name: str) -> keras.losses.Loss:
    """A fresh loss object from its command-line name.

    Args:
        name: a key of LOSSES.

    Returns:
        The loss, for one sigmoid channel or C softmax channels alike.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name].make()


# ------------------------------------------------------------------------------------------------
# Deep supervision (nnU-Net): the loss of every decoder level, the lower ones weighing less.


def deep_supervision_weights(heads: int) -> list[float]:
    """nnU-Net's weights of the heads, full resolution first: 1, 1/2, 1/4, ..., the lowest level 0
    (its 2**-(heads-1) resolution is too coarse to help), normalized to sum to 1.

    Args:
        heads: outputs, the full-resolution one included.

    Returns:
        One weight per head ([1.0] for one head).
    """
    weights = [0.5**i for i in range(heads)]
    if heads > 1:
        weights[-1] = 0.0
    return [w / sum(weights) for w in weights]


def downsample(labels: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour down-sampling of a label map (N, ..., 1) or of probabilities by an
    integer `factor` on every spatial axis: every `factor`-th pixel, from the first. It keeps
    labels labels (no blend of two classes) and gives back exactly a map up-sampled by repetition.
    """
    spatial = len(labels.shape) - 2
    return labels[(slice(None), *[slice(None, None, factor)] * spatial, slice(None))]


@keras.saving.register_keras_serializable(package="tp4")
class DeepSupervisionLoss(_SegmentationLoss):
    """A segmentation loss at every head of a deep-supervised U-Net (unet.build_unet with
    deep_supervision): head i, at 1/2**i of the input size, against the masks down-sampled to its
    size, weighted by `deep_supervision_weights`.

    The heads come packed along the channels, full resolution first, each up-sampled to the input
    size by repetition (so down-sampling gives each back exactly).
    """

    def __init__(self, loss, heads, name=None, **kwargs):
        loss = keras.losses.get(loss) if isinstance(loss, dict) else loss
        super().__init__(name=name or f"deep_supervision_{loss.name}", **kwargs)
        self.loss, self.heads = loss, heads
        self.weights = deep_supervision_weights(heads)

    def batch_loss(self, y_true, y_pred):
        channels = y_pred.shape[-1] // self.heads
        total = 0.0
        for i, weight in enumerate(self.weights):
            if weight == 0:
                continue
            head = y_pred[..., i * channels : (i + 1) * channels]
            truth, head = downsample(y_true, 2**i), downsample(head, 2**i)
            total += weight * self.loss.batch_loss(truth, head)
        return total

    def get_config(self):
        loss = keras.saving.serialize_keras_object(self.loss)
        return {**super().get_config(), "loss": loss, "heads": self.heads}
