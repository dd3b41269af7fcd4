"""The parent run of a cross-validation, whoever trains its folds: one process (`--folds K`), or
one machine per fold (`--fold I`), all logging to one tracking server.

What this module teaches:
- a cross-validation is known by its key (the parent's tag `cv_key`): a digest of its folds
  (splits.json), its data (content hash), its architecture and its recipe. The folds of one
  cross-validation find each other by it wherever they run, and another recipe never joins them;
- `--fold I` nests its run under the unfinished parent of its key (SCHEDULED: waiting for its
  folds; KILLED or FAILED: a `--folds K` that stopped part-way), or creates one, SCHEDULED (no
  process runs it, so nothing marks it KILLED);
- whichever run finishes a fold (a `--fold I`, or a `--resume` of one) and then finds all K folds
  FINISHED writes the parent's summary and ends it FINISHED. The summary is a function of the K
  fold runs, so two folds finishing at once write the same numbers. Parents made by folds that
  started at the same moment are merged then, before any summary: every fold moves under the
  first by run id and the others are deleted. All of them were made when their folds started, so
  every fold that finishes sees the same ones.
"""

import contextlib
import hashlib
import json

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tp4.tracking import liveness

KEY_TAG = "cv_key"
WAITING = ("SCHEDULED", "KILLED", "FAILED")  # a parent still without its summary
DATA_KEYS = ("data_hash", "data_count", "data_shape")  # the data, wherever its folder is


def key(fold_list, description, architecture, recipe_params) -> str:
    """The key of a cross-validation: 16 hex digits of the digest of what makes its folds
    comparable (the folds, the data's content, the architecture and the recipe's params)."""
    data = {name: description.get(name) for name in DATA_KEYS}
    text = json.dumps([fold_list, data, architecture, recipe_params], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _waiting_parents(client, experiment_id, cv_key):
    found = client.search_runs([experiment_id], f"tags.{KEY_TAG} = '{cv_key}'", max_results=1000)
    parents = [
        run
        for run in found
        if run.info.status in WAITING and "mlflow.parentRunId" not in run.data.tags
    ]
    return sorted(parents, key=lambda run: run.info.run_id)


def find_or_create(experiment, name, cv_key, log) -> str:
    """The run id of the unfinished parent of `cv_key` in `experiment` (the first by run id), or of
    a new one named `name`, on which `log()` logs the params and splits (as the active run), then
    ended SCHEDULED."""
    client = MlflowClient()
    experiment_id = mlflow.set_experiment(experiment).experiment_id
    waiting = _waiting_parents(client, experiment_id, cv_key)
    if waiting:
        print(f"joining cross-validation {waiting[0].info.run_name} ({waiting[0].info.run_id})")
        return waiting[0].info.run_id
    tags = {KEY_TAG: cv_key, **liveness.process_tags()}  # killed meanwhile: marked KILLED
    parent = mlflow.start_run(
        experiment_id=experiment_id, run_name=name, tags=tags, log_system_metrics=False
    )
    try:
        log()
    except BaseException:
        mlflow.end_run("FAILED")
        client.delete_run(parent.info.run_id)  # half-logged: no fold may join it
        raise
    mlflow.end_run("SCHEDULED")
    print(f"new cross-validation {name} ({parent.info.run_id}): its folds join it")
    return parent.info.run_id


def _finished_folds(client, experiment_id, parents) -> dict[int, object]:
    """The newest FINISHED fold run of each fold index under `parents`."""
    chosen = {}
    for parent in parents:
        children = client.search_runs(
            [experiment_id],
            f"tags.mlflow.parentRunId = '{parent.info.run_id}' and attributes.status = 'FINISHED'",
            max_results=1000,
        )
        for child in children:
            index = int(child.data.params["cv_fold"])
            if index not in chosen or child.info.end_time > chosen[index].info.end_time:
                chosen[index] = child
    return chosen


def complete(parent_id, k, write) -> bool:
    """Write the summary of parent `parent_id` if all its `k` folds are FINISHED, and end it
    FINISHED; a line says which folds it still waits for otherwise.

    Args:
        parent_id: the parent of the fold that just finished.
        k: its number of folds.
        write: `write(parent_id, fold_runs)` logs the summary of the K fold runs (in fold order).

    Returns:
        Whether this call wrote the summary.
    """
    client = MlflowClient()
    parent = client.get_run(parent_id)
    if parent.info.status not in WAITING:  # RUNNING: its --folds K writes it; or done already
        return False
    experiment_id = parent.info.experiment_id
    cv_key = parent.data.tags.get(KEY_TAG)
    others = _waiting_parents(client, experiment_id, cv_key) if cv_key else []
    parents = sorted(
        [parent, *(p for p in others if p.info.run_id != parent_id)],
        key=lambda run: run.info.run_id,
    )
    finished = _finished_folds(client, experiment_id, parents)
    missing = sorted(set(range(k)) - finished.keys())
    if missing:
        waits = ", ".join(map(str, missing))
        print(
            f"\n{parent.info.run_name}: {len(finished)} of {k} folds finished; waiting for {waits}"
        )
        return False
    kept, *merged = parents
    for other in merged:  # every fold under the first parent, the others deleted
        moved = client.search_runs(
            [experiment_id], f"tags.mlflow.parentRunId = '{other.info.run_id}'", max_results=1000
        )
        for child in moved:
            client.set_tag(child.info.run_id, "mlflow.parentRunId", kept.info.run_id)
        with contextlib.suppress(MlflowException):  # deleted by a fold finishing at once
            client.delete_run(other.info.run_id)
    write(kept.info.run_id, [finished[i] for i in range(k)])
    client.set_terminated(kept.info.run_id, "FINISHED")
    return True
