"""Test-set evaluation as the challenges report it: per case, per class, overlap and surface.

What this module teaches:
- a segmentation challenge (Medical Segmentation Decathlon, BraTS, KiTS) scores every case, then
  averages: Dice next to the 95th-percentile Hausdorff distance (HD95) and the normalized surface
  Dice (NSD), in millimetres, each case with its own voxel size;
- an average hides the failures, so the per-case table is kept (an MLflow JSON artifact,
  `report.py --cases RUN_ID` prints it): one row per case and class, with the sizes of both masks;
- empty masks need rules, not NaNs: HD95 is undefined when a mask is empty, so `test_hd95` is the
  mean over the cases where both masks have foreground, and the cases where exactly one is empty (a
  missed lesion, a false alarm on a healthy case) are counted apart; NSD is 1 when both are empty
  and 0 when one is, so `test_nsd` averages every case;
- several classes are scored one foreground class at a time, then averaged: `test_dice_class2` is
  the Dice of class 2 over the test set, `test_dice` the mean over the foreground classes.

The metrics are metrics.py's reference functions; recipe.evaluate calls `test_metrics`.
"""

import numpy as np

import data
import metrics

TABLE_COLUMNS = (
    "case",
    "class",
    "spacing",
    "dice",
    "iou",
    "hd95",
    "nsd",
    "true_voxels",
    "predicted_voxels",
)


def case_rows(
    masks: np.ndarray, labels: np.ndarray, cases: data.Cases, tolerance: float, num_classes: int
) -> list[dict]:
    """One row per case and foreground class: Dice, IoU, HD95, NSD at `tolerance`, mask sizes.

    Args:
        masks: (N, ..., 1) true label maps.
        labels: (N, ...) predicted labels (metrics.label_map).
        cases: the name and voxel size of each example.
        tolerance: NSD tolerance, in the unit of the spacing.
        num_classes: classes, background included (2: binary).

    Returns:
        Rows with the keys of TABLE_COLUMNS, classes 1..num_classes-1 for each case.
    """
    truth, classes = masks[..., 0], range(1, num_classes)
    rows = []
    for i, (case, spacing) in enumerate(zip(cases.ids, cases.spacing)):
        for c in classes:
            true, pred = truth[i] == c, labels[i] == c
            rows.append(
                {
                    "case": case,
                    "class": c,
                    "spacing": "x".join(f"{s:.3g}" for s in spacing),
                    "dice": metrics.dice_coefficient(true, pred),
                    "iou": metrics.iou_score(true, pred),
                    "hd95": metrics.hd95(true, pred, spacing),
                    "nsd": metrics.surface_dice(true, pred, tolerance, spacing),
                    "true_voxels": int(true.sum()),
                    "predicted_voxels": int(pred.sum()),
                }
            )
    return rows


def _mean(values):
    """The mean of the values that are not NaN; NaN if there is none."""
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _class_metrics(truth, pred, rows):
    """The test metrics of one class: its masks over the test set, and its rows of the table."""
    both = [r["hd95"] for r in rows if r["true_voxels"] and r["predicted_voxels"]]
    return {
        "test_dice": metrics.dice_coefficient(truth, pred),
        "test_iou": metrics.iou_score(truth, pred),
        "test_dice_per_image": metrics.dice_coefficient(truth, pred, per_image=True),
        "test_hd95": _mean(both),
        "test_nsd": float(np.mean([r["nsd"] for r in rows])),
        "test_one_empty": sum(
            (r["true_voxels"] == 0) != (r["predicted_voxels"] == 0) for r in rows
        ),
    }


def test_metrics(
    masks: np.ndarray,
    probabilities: np.ndarray,
    cases: data.Cases | None = None,
    tolerance: float = 1.0,
    threshold: float = 0.5,
) -> tuple[dict[str, float], dict]:
    """The test metrics and the per-case table, from the predicted probabilities.

    Args:
        masks: (N, ..., 1) true label maps (0/1 for a binary task).
        probabilities: (N, ..., 1) sigmoid or (N, ..., C) softmax outputs.
        cases: name and voxel size of each example (None: their position, voxels of 1).
        tolerance: NSD tolerance, in the unit of the spacing (mm for NIfTI).
        threshold: sigmoid outputs: foreground where the probability is >= threshold.

    Returns:
        (metrics, table). metrics: test_dice, test_iou (over all test voxels pooled),
        test_dice_per_image, test_hd95 (mean over the cases where both masks have foreground; NaN
        if none has), test_nsd (mean over every case), test_one_empty (cases with exactly one
        empty mask); with C >= 3 classes, the same per class (`test_dice_class1`...) and their
        mean over the foreground classes (test_one_empty: their sum). table: the rows of
        `case_rows` as {"columns": [...], "data": [[...], ...]} (pandas' "split" orientation),
        an infinite HD95 written as null (JSON has no infinity).
    """
    if cases is None:  # synthetic data: cases named by their position, voxels of 1
        cases = data.Cases(
            [str(i) for i in range(len(masks))], np.ones((len(masks), masks.ndim - 2))
        )
    num_classes = max(2, probabilities.shape[-1])
    labels = metrics.label_map(probabilities, threshold)
    rows = case_rows(masks, labels, cases, tolerance, num_classes)
    per_class = {
        c: _class_metrics(
            (masks[..., 0] == c).astype(np.uint8), labels == c, [r for r in rows if r["class"] == c]
        )
        for c in range(1, num_classes)
    }
    if num_classes == 2:
        results = per_class[1]
    else:
        results = {f"{k}_class{c}": v for c, values in per_class.items() for k, v in values.items()}
        for key in per_class[1]:
            of_classes = [class_metrics[key] for class_metrics in per_class.values()]
            results[key] = sum(of_classes) if key == "test_one_empty" else _mean(of_classes)
    table = {
        "columns": list(TABLE_COLUMNS),
        "data": [[None if r[k] == float("inf") else r[k] for k in TABLE_COLUMNS] for r in rows],
    }
    return results, table
