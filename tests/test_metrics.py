"""metrics.py against hand-computed cases, scikit-learn, and brute-force surface distances."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist
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


# ---- surface metrics
# ------------------------------------------------------------------------------------------------


def _square(shift=0):
    """A 32x32 square in a 64x64 image, moved `shift` pixels along axis 1."""
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16 + shift : 48 + shift] = 1
    return mask


def test_surface_is_the_ring_of_4_connected_border_pixels_and_the_image_border_counts():
    ring = _square().astype(bool)
    ring[17:47, 17:47] = False  # the 124 pixels with a 4-neighbour outside the square
    np.testing.assert_array_equal(metrics.surface(_square()), ring)
    # A diagonal neighbour outside does not make a surface pixel (cross, not 3x3 square).
    plus = np.zeros((5, 5), bool)
    plus[1:4, 1:4] = True
    plus[1, 1] = False
    assert metrics.surface(plus)[2, 2] == False  # noqa: E712 (a NumPy bool)
    # Outside the image is background: a full image has its outer ring as surface (MONAI's padding).
    assert metrics.surface(np.ones((4, 4))).sum() == 12


def test_a_square_shifted_by_4_pixels_by_hand():
    """Distances of the shifted square's 124 surface pixels to the other square's surface: top and
    bottom rows 28 x 0 and 1, 2, 3, 4; the column inside the other square 1, 2, 3, 24 x 4, 3, 2, 1
    (rows 17-46); the column outside 30 x 4. The same in the other direction, by symmetry."""
    truth, pred = _square(), _square(shift=4)
    assert metrics.hd95(truth, pred) == 4.0  # 56 of 124 distances are 4: the 95th percentile is 4
    assert metrics.assd(truth, pred) == pytest.approx(248 / 124)
    assert metrics.surface_dice(truth, pred, tolerance=4) == 1.0
    assert metrics.surface_dice(truth, pred, tolerance=3) == pytest.approx(68 / 124)  # 2x31 + 6
    assert metrics.surface_dice(truth, pred, tolerance=0) == pytest.approx(56 / 124)  # 2 x 28
    # Probabilities are thresholded, and a trailing channel axis is allowed.
    assert metrics.hd95(truth[..., None], 0.3 + 0.4 * pred[..., None], spatial_dims=2) == 4.0
    assert metrics.hd95(truth, 0.3 + 0.4 * pred, threshold=0.8) == float("inf")


def test_anisotropic_spacing_scales_each_axis():
    truth, pred = _square(), _square(shift=4)
    # 0.5 along the shift: the 4-pixel shift is 2 units; distances <= 1: 2 x 30 in the rows, rows
    # 17 and 46 of the inner column.
    assert metrics.hd95(truth, pred, spacing=(1.0, 0.5)) == 2.0
    assert metrics.surface_dice(truth, pred, 1.0, spacing=(1.0, 0.5)) == pytest.approx(62 / 124)
    # 2 across the shift: the shift stays 4, the inner column's distances to the rows double.
    assert metrics.hd95(truth, pred, spacing=(2.0, 1.0)) == 4.0
    assert metrics.surface_dice(truth, pred, 3.0, spacing=(2.0, 1.0)) == pytest.approx(64 / 124)
    # One pixel each, moved by 3 along one axis: the distance is 3 x that axis' spacing.
    dot, moved = np.zeros((8, 8)), np.zeros((8, 8))
    dot[2, 2], moved[5, 2] = 1, 1
    assert metrics.hd95(dot, moved, spacing=(0.7, 2.0)) == pytest.approx(2.1)
    assert metrics.surface_dice(dot, moved, 2.0, spacing=(0.7, 2.0)) == 0.0
    assert metrics.surface_dice(dot, moved, 2.1, spacing=(0.7, 2.0)) == 1.0


def _block_pair():
    """A 3x3 block in a (5, 5, 1) array, and the same moved by one along axis 0."""
    truth = np.zeros((5, 5, 1), np.uint8)
    truth[1:4, 1:4] = 1
    return truth, np.roll(truth, 1, axis=0)


def test_the_spatial_rank_comes_from_the_spacing_or_spatial_dims_never_a_trailing_1():
    """As a volume of width 1, every voxel of a block is surface (the width axis erodes it all):
    each block's 9 voxels, 6 on the other block (distance 0) and 3 one row away (1): ASSD 6/18,
    NSD@0 12/18. As a 2D image, the rings of 8 pixels: each has 4 at distance 1: ASSD 8/16."""
    truth, pred = _block_pair()
    for volume in ({"spacing": (1.0, 1.0, 1.0)}, {"spatial_dims": 3}):
        assert metrics.assd(truth, pred, **volume) == pytest.approx(1 / 3)
        assert metrics.surface_dice(truth, pred, 0.0, **volume) == pytest.approx(2 / 3)
        assert metrics.hd95(truth, pred, **volume) == 1.0
    assert metrics.assd(truth[..., None], pred[..., None], (1.0, 1.0, 1.0)) == pytest.approx(1 / 3)
    # Spacing scales the volume's axes in order: the shift is along axis 0 (2 mm).
    assert metrics.assd(truth, pred, (2.0, 1.0, 5.0)) == pytest.approx(2 / 3)
    for image in ({"spacing": (1.0, 1.0)}, {"spatial_dims": 2}):
        assert metrics.assd(truth, pred, **image) == pytest.approx(0.5)
        assert metrics.surface_dice(truth, pred, 0.0, **image) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="ambiguous"):  # neither says which: refused
        metrics.assd(truth, pred)
    with pytest.raises(ValueError, match="spacing"):
        metrics.assd(truth, pred, spacing=(1.0, 1.0), spatial_dims=3)


def test_nsd_counts_a_distance_equal_to_the_tolerance_despite_float_rounding():
    dot, moved = np.zeros((8, 8)), np.zeros((8, 8))
    dot[1, 1], moved[4, 1] = 1, 1
    to_truth, _ = metrics.surface_distances(dot, moved, spacing=0.1)
    assert to_truth[0] > 0.3  # 3 x 0.1 is 0.30000000000000004 in float64
    assert metrics.surface_dice(dot, moved, tolerance=0.3, spacing=0.1) == 1.0
    # The slack is relative and tiny: 2e-6 over the tolerance is outside it.
    assert metrics.surface_dice(dot, moved, tolerance=0.3, spacing=(0.1000002, 0.1)) == 0.0
    # A square moved 3 voxels of 0.1 mm: every distance is <= 0.3 mm (exact comparison: 0.53).
    assert metrics.surface_dice(_square(), _square(shift=3), 0.3, spacing=0.1) == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_surface_distances_match_brute_force_pairwise_distances_in_3d(seed):
    rng = np.random.default_rng(seed)
    spacing = (2.5, 0.8, 1.1)
    truth = rng.random((10, 12, 14)) < 0.3
    pred = rng.random((10, 12, 14)) < 0.3
    ring_t, ring_p = metrics.surface(truth), metrics.surface(pred)
    points_t, points_p = np.argwhere(ring_t) * spacing, np.argwhere(ring_p) * spacing
    pairwise = cdist(points_p, points_t)  # independent of the distance transform
    to_truth, to_pred = pairwise.min(axis=1), pairwise.min(axis=0)
    expected = max(np.percentile(to_truth, 95), np.percentile(to_pred, 95))
    assert metrics.hd95(truth, pred, spacing) == pytest.approx(expected)
    within = (np.sum(to_truth <= 2.0) + np.sum(to_pred <= 2.0)) / (len(to_truth) + len(to_pred))
    assert metrics.surface_dice(truth, pred, 2.0, spacing) == pytest.approx(within)
    both = np.concatenate([to_truth, to_pred])
    assert metrics.assd(truth, pred, spacing) == pytest.approx(both.mean())


def test_empty_masks_for_surface_metrics():
    empty, square = np.zeros((64, 64)), _square()
    assert metrics.hd95(empty, empty) == 0.0 and metrics.surface_dice(empty, empty, 1.0) == 1.0
    assert metrics.assd(empty, empty) == 0.0
    for truth, pred in ((square, empty), (empty, square)):
        assert metrics.hd95(truth, pred) == float("inf")
        assert metrics.assd(truth, pred) == float("inf")
        assert metrics.surface_dice(truth, pred, 100.0) == 0.0


def test_surface_metrics_refuse_bad_inputs():
    with pytest.raises(ValueError, match="one image"):
        metrics.hd95(np.zeros((2, 3, 8, 8)), np.zeros((2, 3, 8, 8)))
    with pytest.raises(ValueError, match="spacing"):
        metrics.hd95(_square(), _square(), spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="spacing"):
        metrics.hd95(_square(), _square(), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        metrics.surface_dice(_square(), _square(), tolerance=-1)
    with pytest.raises(ValueError, match="binary"):
        metrics.hd95(np.full((4, 4), 0.5), np.zeros((4, 4)))
