"""K-fold cross-validation as nnU-Net runs it, in MLflow: one parent run, a nested run per fold.

What this module teaches:
- the cases of the training and validation splits are shared out in K folds (folds.py); each fold
  trains the script's own `train` on K-1 of them and is scored on the one held out: its nested
  run holds its curves, its model and the held-out cases' metrics (test_cases.json);
- the parent run holds the summary: the mean and the standard deviation over the folds of every
  test metric (`test_dice_mean`, `test_dice_std`...), the out-of-fold table of every case
  (`oof_cases.json`, nnU-Net's summary.json), and splits.json;
- the usual test split stays out of every fold: the K models' ensemble (their mean probability,
  tp4/inference/ensemble.py) is scored there (`ensemble_test_*`), beside each model alone
  (`single_test_*_mean`, `_std`), which says what the ensemble adds;
- `--fold I` trains one fold alone (N machines, one fold each: same --seed, same folds), nested
  under the parent of its cross-validation, and `--resume RUN_ID` continues one fold's run; the
  last fold to finish writes the parent's summary (cvparent.py);
- 2D images (train.py) and 3D volumes (conv3d.py) alike: the network's input says the patch.
"""

import dataclasses
import time

import mlflow
import mlflow.keras
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric

import data
import unet
from tp4.distributed import distribute
from tp4.images import datasets, geometry
from tp4.inference import ensemble
from tp4.planning import auto
from tp4.tracking import runs
from tp4.training import cvparent, evaluation, folds, recipe


def _source(config):
    return config.data_dir or (None if config.dataset == "synthetic" else config.dataset)


def load_pool(config, load_data, shape):
    """(pool of the folds, outer test split (images, masks, cases), description): the examples of
    the usual training and validation splits pooled with their cases; synthetic scans are their
    own cases (case_000, ...), real examples keep their scan's (datasets' groups), cut to the
    network's spatial `shape` ((H, W) slices or (D, H, W) patches)."""
    source = _source(config)
    if not source:
        splits, description, _ = load_data(config)
        images = np.concatenate([splits["train"][0], splits["val"][0]])
        masks = np.concatenate([splits["train"][1], splits["val"][1]])
        names = np.array([f"case_{i:03d}" for i in range(len(images))])
        spacing = np.ones((len(images), images.ndim - 2))
        return (
            folds.Pool(images, masks, names, list(names), spacing),
            (*splits["test"], None),
            description,
        )
    print(f"reading and checking {source}", flush=True)
    classes = getattr(config, "num_classes", 2)  # conv3d.py's masks are binary
    examples = datasets.load(source, shape, classes, auto.preprocessing(config.planned))
    splits, assignment = datasets.split(examples, config.seed)
    description = datasets.describe(examples, splits, assignment)
    data.require_foreground(splits, description["data_source"])
    pooled = np.isin(examples.groups, np.concatenate([assignment["train"], assignment["val"]]))
    names = np.array([examples.group_names[g] for g in examples.groups])
    ids = examples.case_ids or list(names)
    spacing = examples.spacing
    spacing = np.ones((len(names), examples.images.ndim - 2)) if spacing is None else spacing
    chosen = np.flatnonzero(pooled)
    pool = folds.Pool(
        examples.images[chosen],
        examples.masks[chosen],
        names[chosen],
        [ids[i] for i in chosen],
        spacing[chosen],
    )
    outer = (*splits["test"], datasets.split_cases(examples, assignment))
    return pool, outer, description


def train_fold(config, index, fold_list, pool, description, train, name):
    """Train fold `index` with the script's `train(config, loaded)`, in a run named
    `{name}_fold{index}` (nested under the active run or runs.nested_under's); returns its
    results."""
    splits, cases = pool.split(folds.assignment(fold_list[index], config.seed))
    counts = "/".join(str(len(images)) for images, _ in splits.values())
    fold_description = {**description, "data_split": counts, "cv_fold": index}
    fold_description["cv_folds"] = len(fold_list)
    data.require_foreground(splits, description["data_source"])
    run_name = config.run_name if config.resume else f"{name}_fold{index}"
    fold_config = dataclasses.replace(config, fold=index, folds=len(fold_list), run_name=run_name)
    print(f"\nfold {index} of {len(fold_list)}: {counts} train/val/held-out examples", flush=True)
    results = train(fold_config, (splits, fold_description, cases))
    MlflowClient().log_dict(results["run_id"], fold_list, folds.SPLITS_FILE)
    return results


def summary(fold_results: list[dict]) -> dict[str, float]:
    """Mean and standard deviation over the folds of every test metric: `{key}_mean`,
    `{key}_std` (population std, NaN folds left out)."""
    keys = [
        k
        for k in fold_results[0]
        if k.startswith("test_") and isinstance(fold_results[0][k], (int, float))
    ]
    out = {}
    for key in keys:
        values = np.array([r[key] for r in fold_results], dtype=float)
        finite = values[np.isfinite(values)]
        out[f"{key}_mean"] = float(finite.mean()) if finite.size else float("nan")
        out[f"{key}_std"] = float(finite.std()) if finite.size else float("nan")
    return out


def out_of_fold(tables: list[dict]) -> dict:
    """The folds' held-out per-case tables as one, a `fold` column first: every case once."""
    columns = ["fold", *tables[0]["columns"]]
    rows = [[i, *row] for i, table in enumerate(tables) for row in table["data"]]
    return {"columns": columns, "data": rows}


def ensemble_scores(config, model_uris, outer) -> dict[str, float]:
    """The fold models on the outer test split: their ensemble's metrics (`ensemble_test_*`) and
    each model's alone (`single_test_*_mean`, `_std`)."""
    images, masks, cases = outer
    batch = recipe.EVAL_BATCH_FACTOR * config.batch_size
    models = [mlflow.keras.load_model(uri) for uri in model_uris]

    def probabilities(model):
        def predict(batch_images):
            return distribute.predict(model, batch_images, batch)

        return geometry.predict_mirrored(predict, images) if config.tta else predict(images)

    tolerance = config.nsd_tolerance
    singles = [
        evaluation.test_metrics(masks, probabilities(m), cases, tolerance)[0] for m in models
    ]
    combined = probabilities(ensemble.average_model(models))
    together, _ = evaluation.test_metrics(masks, combined, cases, tolerance)
    scores = {f"ensemble_{key}": value for key, value in together.items()}
    for key, value in summary(singles).items():
        scores[f"single_{key}"] = value
    scores["ensemble_models"] = len(models)
    return scores


METRICS = (("Dice", "test_dice"), ("IoU", "test_iou"), ("HD95", "test_hd95"), ("NSD", "test_nsd"))


def print_table(name, fold_results, scores):
    """One line per fold, the mean ± std, the ensemble on the outer test split."""
    print(f"\n{name}: {len(fold_results)}-fold cross-validation, scores of the held-out folds")
    print(f"{'fold':<12}" + "".join(f"{label:>16}" for label, _ in METRICS))
    for i, results in enumerate(fold_results):
        print(f"{i:<12}" + "".join(f"{results[key]:>16.4f}" for _, key in METRICS))
    spread = [f"{scores[key + '_mean']:.4f} ± {scores[key + '_std']:.4f}" for _, key in METRICS]
    print(f"{'mean ± std':<12}" + "".join(f"{text:>16}" for text in spread))
    print(
        f"outer test split ({scores['ensemble_models']} models): ensemble Dice "
        f"{scores['ensemble_test_dice']:.4f}, one model alone {scores['single_test_dice_mean']:.4f}"
        f" ± {scores['single_test_dice_std']:.4f}"
    )


def log_parent(config, model, description, pool, outer, fold_list, cv_key) -> None:
    """The parent's params (architecture, recipe, data), dataset, splits.json and plan, logged to
    the active run; its `cv_key` tag lets the folds of other machines find it."""
    mlflow.set_tag(cvparent.KEY_TAG, cv_key)
    mlflow.log_params({**unet.describe(model), **recipe.params(config), **description})
    mlflow.log_param("cv_folds", len(fold_list))
    examples = {"folds": (pool.images, pool.masks), "test": (outer[0], outer[1])}
    mlflow.log_input(runs.dataset(description, examples, config.seed), context="training")
    mlflow.log_dict(fold_list, folds.SPLITS_FILE)
    auto.log(config.planned)  # --plan auto: the folds' plan, for predict.py's ensemble


def write_summary(config, parent_id, fold_runs, outer) -> dict:
    """The summary of the parent run `parent_id` from its K FINISHED fold runs (in fold order):
    mean and std of the test metrics, the out-of-fold table, the ensemble on the outer test split;
    logged to the parent and printed. Returns the parent's metrics."""
    client = MlflowClient()
    fold_results = [run.data.metrics for run in fold_runs]
    scores = summary(fold_results)
    uris = [ensemble.model_uri(run) for run in fold_runs]
    scores.update(ensemble_scores(config, uris, outer))
    now = int(time.time() * 1000)
    client.log_batch(
        parent_id, [Metric(key, float(value), now, 0) for key, value in scores.items()]
    )
    tables = [
        mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/test_cases.json") for run in fold_runs
    ]
    client.log_dict(parent_id, out_of_fold(tables), "oof_cases.json")
    print_table(client.get_run(parent_id).info.run_name, fold_results, scores)
    return scores


def run(config, train, load_data, build_model) -> dict:
    """Cross-validate the script's `train(config, loaded)`: every fold in nested runs under one
    parent run (its summary logged there), or the one fold of --fold (nested under the parent of
    its cross-validation, found or created; the parent summarized once all K folds finished).

    Returns:
        The parent's metrics and where it is (run_id, experiment_id); with --fold, the fold's
        results.
    """
    model = build_model(config)  # its name, architecture and patch, as the folds' runs log them
    pool, outer, description = load_pool(config, load_data, tuple(model.input_shape[1:-1]))
    fold_list = folds.of(config, sorted(set(pool.cases)))
    name = recipe.run_name(model, config)
    parent_name = f"{name}_cv{len(fold_list)}"
    cv_key = cvparent.key(fold_list, description, unet.describe(model), recipe.params(config))

    def log():
        log_parent(config, model, description, pool, outer, fold_list, cv_key)

    def write(parent_id, fold_runs):
        return write_summary(config, parent_id, fold_runs, outer)

    if config.fold is not None:
        if config.fold >= len(fold_list):
            raise ValueError(f"--fold {config.fold}: the folds are 0 to {len(fold_list) - 1}")
        if config.resume:  # the parent it started under
            parent_id = MlflowClient().get_run(config.resume).data.tags.get("mlflow.parentRunId")
        else:
            parent_id = cvparent.find_or_create(config.experiment, parent_name, cv_key, log)
        with runs.nested_under(parent_id):
            results = train_fold(config, config.fold, fold_list, pool, description, train, name)
        if parent_id:
            cvparent.complete(parent_id, len(fold_list), write)
        return results
    tracked = runs.tracked_run(
        config.experiment, parent_name, config.checkpoint_dir, data=description
    )
    with tracked as parent:
        log()
        ids = [
            train_fold(config, i, fold_list, pool, description, train, name)["run_id"]
            for i in range(len(fold_list))
        ]
        fold_runs = [MlflowClient().get_run(run_id) for run_id in ids]
        scores = write(parent.info.run_id, fold_runs)
    info = parent.info
    return {
        **scores,
        "run_id": info.run_id,
        "experiment_id": info.experiment_id,
        "folds": [run.data.metrics for run in fold_runs],
    }
