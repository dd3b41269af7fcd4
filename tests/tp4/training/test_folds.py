"""folds.py: K folds by case, fixed by the seed; a user's splits file checked; a fold's
train/validation/held-out parts."""

import json

import numpy as np
import pytest

from tp4.training import folds

CASES = [f"case_{i:02d}" for i in range(11)]


def test_folds_cover_every_case_once_and_are_fixed_by_the_seed():
    made = folds.make(CASES + CASES[:3], 5, seed=3)  # repeats: one case
    held_out = [case for fold in made for case in fold["val"]]
    assert sorted(held_out) == CASES  # every case held out exactly once
    assert [len(fold["val"]) for fold in made] == [3, 2, 2, 2, 2]
    for fold in made:
        assert sorted(fold["train"] + fold["val"]) == CASES
    assert folds.make(CASES, 5, seed=3) == made
    assert folds.make(CASES, 5, seed=4) != made
    with pytest.raises(ValueError, match="5 folds need at least 5 cases"):
        folds.make(CASES[:4], 5, seed=0)


def test_a_users_splits_file_is_read_and_checked(tmp_path):
    path = tmp_path / "splits_final.json"
    mine = [{"train": CASES[:6], "val": CASES[6:]}, {"train": CASES[5:], "val": CASES[:5]}]
    path.write_text(json.dumps(mine))
    assert folds.read(str(path), CASES) == mine
    bad = {
        "unknown cases": [{"train": ["nobody"], "val": CASES[:2]}],
        "trains on held-out cases": [{"train": CASES[:3], "val": CASES[2:4]}],
        "expected a list": {"train": CASES},
    }
    for message, content in bad.items():
        path.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message):
            folds.read(str(path), CASES)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="--splits"):
        folds.read(str(path), CASES)


def test_a_folds_validation_cases_come_from_its_training_cases_never_the_held_out():
    fold = folds.make(CASES, 3, seed=0)[0]
    parts = folds.assignment(fold, seed=0)
    assert parts["test"] == sorted(fold["val"])
    assert sorted(parts["train"] + parts["val"]) == sorted(fold["train"])
    assert len(parts["val"]) == round(0.15 * len(fold["train"]))


def test_a_pool_splits_by_case_so_slices_of_one_scan_stay_together():
    cases = np.array(["a", "a", "b", "b", "c", "d"])
    images = np.arange(6, dtype="float32").reshape(6, 1, 1, 1)
    pool = folds.Pool(
        images, images, cases, [f"{c} slice {i}" for i, c in enumerate(cases)], np.ones((6, 2))
    )
    splits, test_cases = pool.split({"train": ["a", "c"], "val": ["d"], "test": ["b"]})
    assert splits["train"][0].ravel().tolist() == [0, 1, 4]
    assert splits["test"][0].ravel().tolist() == [2, 3]
    assert test_cases.ids == ["b slice 2", "b slice 3"]
