"""--resume: continue an interrupted run from its checkpoint, as the same MLflow run.

    python train.py --resume              # the newest unfinished run of --experiment
    python train.py --resume RUN_ID       # that run (KILLED, or FAILED without diverging)

The configuration is the run's own: the config.json it logged when it started. A flag given with
--resume that would change it is refused; flags that only say where (--experiment,
--checkpoint-dir) are free. The checkpoint is read from --checkpoint-dir/RUN_ID on this machine
(checkpoint.py); the resumed run logs the epochs the store lacks, trains on, and ends FINISHED.
"""

import dataclasses
import json
import os

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tp4.training import checkpoint, config, divergence

PLACE_FLAGS = {"resume", "experiment", "checkpoint_dir"}  # where and which, not what is computed


def configuration(given, command_line, argv: list[str]):
    """The configuration of the run to continue, with `resume` set to its run id.

    Args:
        given: the configuration of the command line (`resume` set: a run id or config.NEWEST).
        command_line: the script's parser, to tell which flags `argv` gives.
        argv: the command line.

    Returns:
        The run's logged configuration (its config.json), of the same class as `given`.

    Raises:
        ValueError: no run to resume, or a given flag would change its configuration.
    """
    client = MlflowClient()
    if given.resume == config.NEWEST:
        run = _newest(client, given.experiment)
    else:
        try:
            run = client.get_run(given.resume)
        except MlflowException as error:
            raise ValueError(f"no run {given.resume} in the tracking store: {error}") from None
    run_id = run.info.run_id
    reason = _not_resumable(run)
    if reason:
        raise ValueError(f"run {run_id} cannot be resumed: {reason}")
    folder = os.path.join(given.checkpoint_dir, run_id)
    readable, _ = checkpoint.newest_readable(folder)  # ValueError: damaged, none to fall back to
    if not readable and client.get_metric_history(run_id, "loss"):
        raise ValueError(
            f"run {run_id} has no checkpoint in {folder} (it ran on {run.data.tags.get('host')})"
        )
    try:
        logged = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/config.json")
    except Exception as error:
        raise ValueError(f"run {run_id} has no readable config.json: {error}") from None
    changed = [
        f"--{name.replace('_', '-')} {getattr(given, name)} (the run has {logged.get(name)})"
        for name in sorted(config.given(command_line, argv) - PLACE_FLAGS)
        if json.loads(json.dumps(getattr(given, name))) != logged.get(name)
    ]
    if changed:
        raise ValueError(
            f"--resume continues run {run_id} as it was configured: {', '.join(changed)} would "
            "change it"
        )
    resumed = type(given).from_json(logged)
    return dataclasses.replace(resumed, resume=run_id, checkpoint_dir=given.checkpoint_dir)


def _newest(client, experiment):
    found = client.get_experiment_by_name(experiment)
    runs = []
    if found:
        runs = client.search_runs(
            [found.experiment_id],
            "attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=100,
        )
    resumable = [run for run in runs if not _not_resumable(run)]
    if not resumable:
        raise ValueError(f"experiment {experiment!r} has no interrupted run to resume")
    return resumable[0]


def _not_resumable(run):
    """Why `run` cannot be resumed, or None."""
    tags, status = run.data.tags, run.info.status
    if status == "FINISHED":
        return "it is FINISHED"
    if status in ("RUNNING", "SCHEDULED"):
        return f"it is {status} (process {tags.get('pid')} on {tags.get('host')})"
    if tags.get("failure", "").startswith(divergence.DIVERGED):
        return "it diverged: start a new run, with a lower --lr"
    return None
