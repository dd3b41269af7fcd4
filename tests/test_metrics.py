"""metrics.py against hand-computed cases and scikit-learn."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import f1_score, jaccard_score

import metrics

TRUTH_2X2 = np.array([[1, 1], [1, 0]])
PRED_2X2 = np.array([[1, 1], [0, 0]])


def test_dice_and_iou_on_a_hand_computed_2x2_case():
    # TP=2, |A|=3, |B|=2: Dice 4/5 exactly (a smooth=1 term would give 5/6), IoU 2/3.
    assert metrics.dice_coefficient(TRUTH_2X2, PRED_2X2) == pytest.approx(0.8, abs=1e-12)
    assert metrics.iou_score(TRUTH_2X2, PRED_2X2) == pytest.approx(2 / 3, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_dice_and_iou_match_scikit_learn_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    truth = (rng.random((6, 32, 32)) < rng.uniform(0.01, 0.6)).astype(int)
    probabilities = rng.random((6, 32, 32))
    flat_true, flat_pred = truth.ravel(), (probabilities >= 0.5).ravel()
    assert metrics.dice_coefficient(truth, probabilities) == pytest.approx(
        f1_score(flat_true, flat_pred)
    )
    assert metrics.iou_score(truth, probabilities) == pytest.approx(
        jaccard_score(flat_true, flat_pred)
    )


def test_per_image_is_the_mean_of_per_image_values():
    truth = np.stack([TRUTH_2X2, TRUTH_2X2, np.zeros((2, 2), int)])
    pred = np.stack([TRUTH_2X2, PRED_2X2, np.zeros((2, 2), int)])
    # Per image: 1.0, 0.8 and 1.0 (both empty); pooled: TP=5, FP=0, FN=1 -> 10/11.
    assert metrics.dice_coefficient(truth, pred, per_image=True) == pytest.approx((1 + 0.8 + 1) / 3)
    assert metrics.dice_coefficient(truth, pred) == pytest.approx(10 / 11)
    assert metrics.iou_score(truth, pred, per_image=True) == pytest.approx((1 + 2 / 3 + 1) / 3)


@pytest.mark.parametrize(
    "truth, pred, expected",
    [
        (np.zeros((4, 4)), np.zeros((4, 4)), 1.0),
        (np.zeros((4, 4)), np.ones((4, 4)), 0.0),
        (np.ones((4, 4)), np.zeros((4, 4)), 0.0),
    ],
)
def test_empty_masks(truth, pred, expected):
    assert metrics.dice_coefficient(truth, pred) == expected
    assert metrics.iou_score(truth, pred) == expected


def test_predictions_are_binarized_at_the_threshold():
    truth = np.array([1, 1, 0, 0])
    probabilities = np.array([0.9, 0.4, 0.6, 0.1])
    assert metrics.dice_coefficient(truth, probabilities) == pytest.approx(0.5)  # TP=1, FP=1, FN=1
    assert metrics.dice_coefficient(truth, probabilities, threshold=0.3) == pytest.approx(0.8)
    assert metrics.dice_coefficient(truth, probabilities, threshold=0.95) == 0.0


def test_dice_iou_identity_holds_on_random_masks():
    rng = np.random.default_rng(7)
    for _ in range(20):
        truth = rng.random((16, 16)) < 0.3
        pred = rng.random((16, 16))
        dice, iou = metrics.dice_coefficient(truth, pred), metrics.iou_score(truth, pred)
        assert dice == pytest.approx(2 * iou / (1 + iou), abs=1e-12)
        assert dice >= iou


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.dice_coefficient(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="binary"):
        metrics.iou_score(np.full((4, 4), 0.5), np.zeros((4, 4)))


def test_keras_metrics_give_the_dataset_value_not_a_mean_of_batches():
    rng = np.random.default_rng(3)
    truth = (rng.random((10, 8, 8, 1)) < rng.uniform(0.05, 0.5, (10, 1, 1, 1))).astype("float32")
    pred = rng.random((10, 8, 8, 1)).astype("float32")
    dice, iou = metrics.DiceMetric(), metrics.IoUMetric()
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
    assert _loss(metrics.SoftDiceLoss(), [1, 0.5, 0.5, 0]) == pytest.approx(0.25, abs=1e-6)


def test_bce_dice_loss_value():
    p = np.array([0.9, 0.6, 0.2, 0.1])
    bce = -np.mean(np.log([0.9, 0.6, 0.8, 0.9]))
    dice = 2 * 1.5 / (2 + p.sum())
    assert _loss(metrics.BCEDiceLoss(), p) == pytest.approx(bce + 1 - dice, abs=1e-5)


def test_tversky_losses_values():
    # p = [1, 0, 0, 0]: TP=1, FP=0, FN=1 -> Tversky index 1 / (1 + 0.7).
    assert _loss(metrics.TverskyLoss(), [1, 0, 0, 0]) == pytest.approx(0.7 / 1.7, abs=1e-6)
    assert _loss(metrics.FocalTverskyLoss(), [1, 0, 0, 0]) == pytest.approx(
        (0.7 / 1.7) ** 0.75, abs=1e-6
    )
    # alpha = beta = 0.5 is the soft Dice loss.
    p = [0.7, 0.2, 0.4, 0.1]
    assert _loss(metrics.TverskyLoss(0.5, 0.5), p) == pytest.approx(
        _loss(metrics.SoftDiceLoss(), p), abs=1e-6
    )


def test_generalized_dice_loss_value():
    y = np.array([1, 0, 0, 0], "float32").reshape(1, 2, 2, 1)
    p = np.array([0.5, 0.5, 0, 0], "float32").reshape(1, 2, 2, 1)
    # lesion: w=1, TP=0.5, Σy+Σp=2; background: w=1/9, TP=2.5, Σy+Σp=6.
    expected = 1 - 2 * (0.5 + 2.5 / 9) / (2 + 6 / 9)
    assert float(metrics.GeneralizedDiceLoss()(y, p)) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", sorted(metrics.LOSSES))
def test_every_loss_pushes_predictions_towards_the_mask(name):
    p = tf.Variable(np.array([0.6, 0.4, 0.5, 0.3], "float32").reshape(Y.shape))
    with tf.GradientTape() as tape:
        value = metrics.get_loss(name)(Y, p)
    gradient = tape.gradient(value, p).numpy().ravel()
    assert (gradient[:2] < 0).all(), "raising p on a lesion pixel must lower the loss"
    assert (gradient[2:] > 0).all(), "raising p on a background pixel must raise the loss"
    assert float(metrics.get_loss(name)(Y, Y)) < float(value)


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss"):
        metrics.get_loss("hinge")


def test_losses_round_trip_through_their_config():
    loss = metrics.FocalTverskyLoss(alpha=0.2, beta=0.8, gamma=2.0)
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert (clone.alpha, clone.beta, clone.gamma) == (0.2, 0.8, 2.0)
    assert _loss(clone, [0.9, 0.1, 0.3, 0.2]) == pytest.approx(_loss(loss, [0.9, 0.1, 0.3, 0.2]))
