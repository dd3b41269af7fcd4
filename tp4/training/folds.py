"""Cross-validation folds by case, as nnU-Net makes them: K folds of the cases, fixed by the seed.

What this module teaches:
- split by *case*, never by example: the slices or patches of one scan all land in the same fold,
  or the held-out score would be measured on near-copies of training images;
- the folds are a file (`splits.json`, nnU-Net's `splits_final.json` format: a list of
  {"train": [case, ...], "val": [case, ...]}, one per fold): logged with every run, and a user's own
  file is accepted (`--splits FILE`), so that a comparison uses the same folds;
- each fold trains on K-1 folds and is scored on the one held out (its run's test metrics). Early
  stopping needs a validation set of its own: a share of the fold's training cases, never the
  held-out ones, so that the held-out score is not chosen on the data it measures.

The cases outside the K folds (the usual test split) stay unseen: the folds' ensemble is scored on
them (crossval.py).
"""

import dataclasses
import json

import numpy as np
from sklearn.model_selection import KFold, train_test_split

import data
from tp4 import cli
from tp4.training.config import option

SPLITS_FILE = "splits.json"
DEFAULT_FOLDS = 5  # nnU-Net's
VAL_FRACTION = 0.15  # of a fold's training cases: its early-stopping validation set


@dataclasses.dataclass(frozen=True)
class Settings:
    """The cross-validation flags (a script's Config inherits them)."""

    folds: int | None = option(
        None,
        "K-fold cross-validation by case (K = 5 when the flag is bare): one parent MLflow run, one "
        "nested run per fold, the mean and spread of every test metric and the out-of-fold table",
        nargs="?",
        const=DEFAULT_FOLDS,
        type=cli.at_least(2),
        metavar="K",
    )
    fold: int | None = option(
        None,
        "train only fold I (0 to K-1) of --folds K (5 by default): one machine per fold",
        type=cli.at_least(0),
        metavar="I",
    )
    splits: str | None = option(
        None,
        "the folds from a JSON file (nnU-Net's splits_final.json: [{'train': [...], 'val': [...]}, "
        "...] of case names) instead of --seed's",
        metavar="FILE",
    )


def make(cases: list[str], k: int, seed: int) -> list[dict[str, list[str]]]:
    """K folds of the cases (scikit-learn's KFold, shuffled by `seed`, as nnU-Net does).

    Args:
        cases: the case names (repeats are one case).
        k: folds.
        seed: same seed, same folds.

    Returns:
        One {"train": names, "val": held-out names} per fold, names sorted.

    Raises:
        ValueError: fewer cases than folds.
    """
    names = sorted(set(cases))
    if not 2 <= k <= len(names):
        raise ValueError(f"{k} folds need at least {k} cases; there are {len(names)}")
    folds = KFold(n_splits=k, shuffle=True, random_state=seed).split(names)
    return [
        {"train": [names[i] for i in train], "val": [names[i] for i in held_out]}
        for train, held_out in folds
    ]


def read(path: str, cases: list[str]) -> list[dict[str, list[str]]]:
    """A splits file, checked against the cases of the data.

    Raises:
        ValueError: unreadable, not a list of {"train", "val"}, an unknown case, a case both
            trained on and held out in one fold.
    """
    try:
        with open(path) as file:
            folds = json.load(file)
    except (OSError, ValueError) as error:
        raise ValueError(f"--splits {path}: {cli.first_line(error)}") from None
    shape_ok = (
        isinstance(folds, list)
        and folds
        and all(isinstance(f, dict) and {"train", "val"} <= f.keys() for f in folds)
    )
    if not shape_ok:
        raise ValueError(f"--splits {path}: expected a list of {{'train': [...], 'val': [...]}}")
    known = set(cases)
    for i, fold in enumerate(folds):
        unknown = sorted((set(fold["train"]) | set(fold["val"])) - known)
        if unknown:
            raise ValueError(f"--splits {path}: fold {i} names unknown cases: {unknown[:3]}")
        both = sorted(set(fold["train"]) & set(fold["val"]))
        if both:
            raise ValueError(f"--splits {path}: fold {i} trains on held-out cases: {both[:3]}")
        if not fold["train"] or not fold["val"]:
            raise ValueError(f"--splits {path}: fold {i} has no training or no held-out case")
    return folds


def of(config, cases: list[str]) -> list[dict[str, list[str]]]:
    """The folds of a configuration: its --splits file, or K = --folds (default 5) from --seed."""
    if config.splits:
        return read(config.splits, cases)
    return make(cases, config.folds or DEFAULT_FOLDS, config.seed)


def assignment(fold: dict[str, list[str]], seed: int) -> dict[str, list[str]]:
    """Train, validation and test cases of one fold: test is the held-out fold, validation a seeded
    VAL_FRACTION of its training cases (early stopping), train the rest."""
    cases = sorted(fold["train"])
    if len(cases) < 2:
        raise ValueError("a fold needs at least 2 training cases (1 for early stopping)")
    train, val = train_test_split(
        cases, test_size=max(1, round(VAL_FRACTION * len(cases))), random_state=seed
    )
    return {"train": sorted(train), "val": sorted(val), "test": sorted(fold["val"])}


@dataclasses.dataclass(frozen=True)
class Pool:
    """The examples the folds share out, each with its case (a slice or patch: its scan's)."""

    images: np.ndarray
    masks: np.ndarray
    cases: np.ndarray  # (N,) case name of each example
    ids: list  # (N,) name of each example, for the per-case table
    spacing: np.ndarray  # (N, spatial dims)

    def split(self, parts: dict[str, list[str]]) -> tuple[dict, data.Cases]:
        """(splits as data.split returns them, the test examples' data.Cases) of an
        `assignment`."""
        splits, chosen = {}, {}
        for name, names in parts.items():
            chosen[name] = np.isin(self.cases, names)
            splits[name] = (self.images[chosen[name]], self.masks[chosen[name]])
        test = np.flatnonzero(chosen["test"])
        return splits, data.Cases([self.ids[i] for i in test], self.spacing[test])
