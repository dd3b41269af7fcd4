"""losses.py: the Keras epoch metrics against metrics.py's reference, the losses against
hand-computed values, for one sigmoid channel and for C softmax channels."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import losses
import metrics


def test_keras_metrics_give_the_dataset_value_not_a_mean_of_batches():
    rng = np.random.default_rng(3)
    truth = (rng.random((10, 8, 8, 1)) < rng.uniform(0.05, 0.5, (10, 1, 1, 1))).astype("float32")
    pred = rng.random((10, 8, 8, 1)).astype("float32")
    dice, iou = losses.DiceMetric(), losses.IoUMetric()
    batch_dice = []
    for start in range(0, 10, 3):  # uneven batches: 3, 3, 3, 1
        for metric in (dice, iou):
            metric.update_state(truth[start : start + 3], pred[start : start + 3])
        batch_dice.append(
            metrics.dice_coefficient(truth[start : start + 3], pred[start : start + 3])
        )
    assert float(dice.result()) == pytest.approx(metrics.dice_coefficient(truth, pred), abs=1e-6)
    assert float(iou.result()) == pytest.approx(metrics.iou_score(truth, pred), abs=1e-6)
    assert (
        abs(float(dice.result()) - np.mean(batch_dice)) > 1e-4
    )  # the batch mean would have been wrong
    dice.reset_state()
    dice.update_state(np.zeros((2, 4, 4, 1)), np.zeros((2, 4, 4, 1)))
    assert float(dice.result()) == 1.0  # both empty


# ---- losses
# ------------------------------------------------------------------------------------------------

Y = np.array([1, 1, 0, 0], "float32").reshape(1, 2, 2, 1)


def _loss(loss, probabilities):
    return float(loss(Y, np.array(probabilities, "float32").reshape(Y.shape)))


def test_soft_dice_loss_value():
    # TP=1.5, Σp=2, Σy=2 -> Dice 3/4.
    assert _loss(losses.SoftDiceLoss(), [1, 0.5, 0.5, 0]) == pytest.approx(0.25, abs=1e-6)


def test_bce_dice_loss_value():
    p = np.array([0.9, 0.6, 0.2, 0.1])
    bce = -np.mean(np.log([0.9, 0.6, 0.8, 0.9]))
    dice = 2 * 1.5 / (2 + p.sum())
    assert _loss(losses.BCEDiceLoss(), p) == pytest.approx(bce + 1 - dice, abs=1e-5)


def test_tversky_losses_values():
    # p = [1, 0, 0, 0]: TP=1, FP=0, FN=1 -> Tversky index 1 / (1 + 0.7).
    assert _loss(losses.TverskyLoss(), [1, 0, 0, 0]) == pytest.approx(0.7 / 1.7, abs=1e-6)
    assert _loss(losses.FocalTverskyLoss(), [1, 0, 0, 0]) == pytest.approx(
        (0.7 / 1.7) ** 0.75, abs=1e-6
    )
    # alpha = beta = 0.5 is the soft Dice loss.
    p = [0.7, 0.2, 0.4, 0.1]
    assert _loss(losses.TverskyLoss(0.5, 0.5), p) == pytest.approx(
        _loss(losses.SoftDiceLoss(), p), abs=1e-6
    )


def test_generalized_dice_loss_value():
    y = np.array([1, 0, 0, 0], "float32").reshape(1, 2, 2, 1)
    p = np.array([0.5, 0.5, 0, 0], "float32").reshape(1, 2, 2, 1)
    # lesion: w=1, TP=0.5, Σy+Σp=2; background: w=1/9, TP=2.5, Σy+Σp=6.
    expected = 1 - 2 * (0.5 + 2.5 / 9) / (2 + 6 / 9)
    assert float(losses.GeneralizedDiceLoss()(y, p)) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_every_loss_pushes_predictions_towards_the_mask(name):
    p = tf.Variable(np.array([0.6, 0.4, 0.5, 0.3], "float32").reshape(Y.shape))
    with tf.GradientTape() as tape:
        value = losses.get_loss(name)(Y, p)
    gradient = tape.gradient(value, p).numpy().ravel()
    assert (gradient[:2] < 0).all(), "raising p on a lesion pixel must lower the loss"
    assert (gradient[2:] > 0).all(), "raising p on a background pixel must raise the loss"
    assert float(losses.get_loss(name)(Y, Y)) < float(value)


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss"):
        losses.get_loss("hinge")


def test_losses_round_trip_through_their_config():
    loss = losses.FocalTverskyLoss(alpha=0.2, beta=0.8, gamma=2.0)
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert (clone.alpha, clone.beta, clone.gamma) == (0.2, 0.8, 2.0)
    assert _loss(clone, [0.9, 0.1, 0.3, 0.2]) == pytest.approx(_loss(loss, [0.9, 0.1, 0.3, 0.2]))


def test_models_saved_when_the_losses_lived_in_metrics_py_still_deserialize():
    # As written in the compile_config of a .keras file saved before losses.py existed.
    saved = {
        "module": "metrics",
        "class_name": "BCEDiceLoss",
        "config": {"name": "bce_dice_loss", "reduction": "sum_over_batch_size", "epsilon": 1e-06},
        "registered_name": "tp4>BCEDiceLoss",
    }
    assert isinstance(keras.saving.deserialize_keras_object(saved), losses.BCEDiceLoss)
    old_metric = {**saved, "class_name": "DiceMetric", "registered_name": "tp4>DiceMetric"}
    old_metric["config"] = {"name": "dice", "dtype": "float32", "threshold": 0.5}
    metric = keras.saving.deserialize_keras_object(old_metric)
    assert isinstance(metric, losses.DiceMetric) and metric.num_classes == 2


# ---- several classes: label maps (N, H, W, 1) of 0..C-1 against C softmax channels
# ------------------------------------------------------------------------------------------------

LABELS = np.array([0, 1, 2, 2], "float32").reshape(1, 2, 2, 1)
SOFTMAX = np.array(
    [[0.8, 0.1, 0.1], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6], [0.5, 0.1, 0.4]], "float32"
).reshape(1, 2, 2, 3)


def test_multiclass_soft_dice_is_the_mean_over_the_foreground_classes():
    # class 1: TP 0.6, Σp 1.1, Σy 1 -> 1.2/2.1; class 2: TP 1.0, Σp 1.3, Σy 2 -> 2/3.3.
    expected = 1 - (1.2 / 2.1 + 2.0 / 3.3) / 2
    assert float(losses.SoftDiceLoss()(LABELS, SOFTMAX)) == pytest.approx(expected, abs=1e-5)


def test_multiclass_cross_entropy_plus_dice():
    cross_entropy = -np.mean(np.log([0.8, 0.6, 0.6, 0.4]))  # the probability of the true class
    dice = float(losses.SoftDiceLoss()(LABELS, SOFTMAX))
    assert float(losses.BCEDiceLoss()(LABELS, SOFTMAX)) == pytest.approx(
        cross_entropy + dice, abs=1e-5
    )
    assert float(losses.get_loss("bce")(LABELS, SOFTMAX)) == pytest.approx(cross_entropy, abs=1e-5)


def test_multiclass_tversky_and_generalized_dice():
    # class 1: TP 0.6, FP 0.5, FN 0.4; class 2: TP 1.0, FP 0.3, FN 1.0.
    index = [0.6 / (0.6 + 0.3 * 0.5 + 0.7 * 0.4), 1.0 / (1.0 + 0.3 * 0.3 + 0.7 * 1.0)]
    assert float(losses.TverskyLoss()(LABELS, SOFTMAX)) == pytest.approx(
        np.mean([1 - i for i in index]), abs=1e-5
    )
    # Generalized Dice over the three classes, weights 1/volume²: 1, 1, 1/4.
    weights, tp, sums = np.array([1, 1, 0.25]), np.array([0.8, 0.6, 1.0]), np.array([2.6, 2.1, 3.3])
    expected = 1 - 2 * (weights * tp).sum() / (weights * sums).sum()
    assert float(losses.GeneralizedDiceLoss()(LABELS, SOFTMAX)) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_every_multiclass_loss_pushes_the_true_class_up(name):
    p = tf.Variable(SOFTMAX)
    with tf.GradientTape() as tape:
        value = losses.get_loss(name)(LABELS, p)
    gradient = tape.gradient(value, p).numpy().reshape(4, 3)
    truth = LABELS.ravel().astype(int)
    others = np.ones((4, 3), bool)
    others[np.arange(4), truth] = False
    # Raising the true class's probability lowers the loss more than raising any other class's.
    assert (gradient[np.arange(4), truth] < gradient[others].reshape(4, 2).min(axis=1)).all()


def test_multiclass_epoch_metrics_are_the_mean_of_per_class_reference_values():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, (6, 8, 8, 1)).astype("float32")
    probabilities = rng.dirichlet(np.ones(3), (6, 8, 8)).astype("float32")
    predicted = probabilities.argmax(-1)[..., None]
    dice, iou = losses.DiceMetric(num_classes=3), losses.IoUMetric(num_classes=3)
    for start in (0, 4):  # uneven batches: 4, 2
        for metric in (dice, iou):
            metric.update_state(labels[start : start + 4], probabilities[start : start + 4])
    for metric, reference in ((dice, metrics.dice_coefficient), (iou, metrics.iou_score)):
        expected = np.mean([reference(labels == c, predicted == c) for c in (1, 2)])
        assert float(metric.result()) == pytest.approx(expected, abs=1e-6)
    clone = losses.DiceMetric.from_config(dice.get_config())
    assert clone.num_classes == 3
