"""evaluation.py: test metrics per case and class, by hand, and the per-case table."""

import json

import numpy as np
import pytest

import data
import metrics
from tp4.training import evaluation


def _square(shift=0):
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 16 + shift : 48 + shift] = 1
    return mask


def _binary_test_set():
    """Four cases: a square predicted 4 pixels off, a perfect one, a healthy case left empty, and a
    missed square."""
    empty = np.zeros((64, 64), np.float32)
    truth = np.stack([_square(), _square(), empty, _square()])[..., None]
    pred = np.stack([_square(4), _square(), empty, empty])[..., None]
    return truth, np.where(pred > 0, 0.9, 0.1).astype(np.float32)  # probabilities


def test_binary_test_metrics_by_hand():
    truth, probabilities = _binary_test_set()
    results, table = evaluation.test_metrics(truth, probabilities, tolerance=1.0)
    # Pooled over the test set, as before surface metrics existed.
    assert results["test_dice"] == metrics.dice_coefficient(truth, probabilities)
    assert results["test_iou"] == metrics.iou_score(truth, probabilities)
    # HD95 over the cases with both masks: 4 (the shifted square, metrics' hand case) and 0.
    assert results["test_hd95"] == 2.0
    # NSD at 1 pixel over every case: 60/124 (metrics' hand case), 1, 1 (both empty), 0 (missed).
    assert results["test_nsd"] == pytest.approx((60 / 124 + 1 + 1 + 0) / 4)
    assert results["test_one_empty"] == 1
    assert table["columns"] == list(evaluation.TABLE_COLUMNS)
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [r["case"] for r in rows] == ["0", "1", "2", "3"] and {r["class"] for r in rows} == {1}
    assert [r["hd95"] for r in rows] == [4.0, 0.0, 0.0, None]  # infinite: null in JSON
    assert [r["true_voxels"] for r in rows] == [1024, 1024, 0, 1024]
    assert [r["predicted_voxels"] for r in rows] == [1024, 1024, 0, 0]
    assert rows[0]["dice"] == pytest.approx(0.875) and rows[0]["spacing"] == "1x1"
    json.dumps(table, allow_nan=False)  # standard JSON: no Infinity, no NaN


def test_each_case_is_measured_with_its_own_voxel_size():
    truth, probabilities = _binary_test_set()
    cases = data.Cases(["a", "b", "c", "d"], np.array([[1, 0.5], [2, 2], [1, 1], [1, 1]]))
    results, table = evaluation.test_metrics(truth, probabilities, cases, tolerance=1.0)
    # The 4-pixel shift along an axis of 0.5 mm: 2 mm (metrics' anisotropic hand case).
    assert results["test_hd95"] == 1.0
    assert table["data"][0][:3] == ["a", 1, "1x0.5"]
    assert results["test_nsd"] == pytest.approx((62 / 124 + 1 + 1 + 0) / 4)


def test_several_classes_are_scored_one_at_a_time_then_averaged():
    labels = np.zeros((2, 64, 64), np.uint8)
    labels[0][_square() > 0] = 1
    labels[1][_square() > 0] = 2
    predicted = labels.copy()
    predicted[0] = np.where(_square(4) > 0, 1, 0)  # class 1 found 4 pixels off in case 0
    predicted[1] = 0  # class 2 missed in case 1
    probabilities = np.eye(3, dtype=np.float32)[predicted]  # one-hot (N, H, W, 3)
    results, table = evaluation.test_metrics(labels[..., None].astype(np.float32), probabilities)
    assert results["test_dice_class1"] == pytest.approx(0.875)
    assert results["test_dice_class2"] == 0.0
    assert results["test_dice"] == pytest.approx((0.875 + 0.0) / 2)
    assert results["test_hd95_class1"] == 4.0
    assert np.isnan(results["test_hd95_class2"])  # no case with both masks of class 2
    assert results["test_hd95"] == 4.0  # the mean over the classes that have one
    # Class 1: case 0 at 60/124, case 1 both empty (1); class 2: case 0 both empty, case 1 missed.
    assert results["test_nsd_class1"] == pytest.approx((60 / 124 + 1) / 2)
    assert results["test_nsd_class2"] == pytest.approx((1 + 0) / 2)
    assert (results["test_one_empty_class1"], results["test_one_empty_class2"]) == (0, 1)
    assert results["test_one_empty"] == 1
    assert [row[:2] for row in table["data"]] == [["0", 1], ["0", 2], ["1", 1], ["1", 2]]
