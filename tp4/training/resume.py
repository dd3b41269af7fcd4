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

from tp4 import cli
from tp4.tracking import liveness, ownership
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
        run, logged = _newest(client, given, command_line.prog)
    else:
        try:
            run = client.get_run(given.resume)
        except MlflowException as error:
            raise ValueError(
                f"no run {given.resume} in the tracking store: {cli.first_line(error)}"
            ) from None
        logged, reason = _configuration_to_resume(client, run, given, command_line.prog)
        if reason:
            raise ValueError(f"run {given.resume} cannot be resumed: {reason}")
    run_id = run.info.run_id
    folder = os.path.join(given.checkpoint_dir, run_id)
    ownership.refuse_if_owned(run_id, folder)  # another --resume of it, started a moment ago
    readable, _ = checkpoint.newest_readable(folder)  # ValueError: damaged, none to fall back to
    if not readable and client.get_metric_history(run_id, "loss"):
        raise ValueError(
            f"run {run_id} has no checkpoint in {folder} (it ran on {run.data.tags.get('host')})"
        )
    changed = changes(given, logged, command_line, argv)
    if changed:
        raise ValueError(
            f"--resume continues run {run_id} as it was configured: {', '.join(changed)} would "
            "change it"
        )
    resumed = type(given).from_json(logged)
    return dataclasses.replace(resumed, resume=run_id, checkpoint_dir=given.checkpoint_dir)


def changes(given, logged, command_line, argv, free=PLACE_FLAGS) -> list[str]:
    """The flags of `argv` (except those named in `free`) whose value in `given` differs from a
    run's `logged` configuration, each as "--epochs 10 (the run has 3)"."""
    return [
        f"--{name.replace('_', '-')} {getattr(given, name)} (the run has {logged.get(name)})"
        for name in sorted(config.given(command_line, argv) - free)
        if not _same(json.loads(json.dumps(getattr(given, name))), logged.get(name))
    ]


def _same(given, logged):
    """Whether a flag's value is what the run logged: the speed choice logs what "auto" chose
    (--precision, --xla) and --xla on/off as true/false."""
    if given == "auto" or given == logged:
        return True
    return isinstance(logged, bool) and given in ("on", "off") and logged == (given == "on")


def _newest(client, given, script):
    """The newest run of `given.experiment` that `script` can resume, and its configuration."""
    found = client.get_experiment_by_name(given.experiment)
    runs = []
    if found:
        runs = client.search_runs(
            [found.experiment_id],
            "attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=100,
        )
    for run in runs:  # newest first; those killed before their config.json are passed over
        logged, reason = _configuration_to_resume(client, run, given, script)
        if not reason:
            return run, logged
    raise ValueError(f"experiment {given.experiment!r} has no interrupted run to resume")


def _configuration_to_resume(client, run, given, script):
    """(the config.json of `run`, None), or (None, why `script` cannot resume it)."""
    reason = _not_resumable(run)
    if reason:
        return None, reason
    if not liveness.has_configuration(client, run.info.run_id):
        return None, liveness.NO_CONFIGURATION
    try:
        logged = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{liveness.CONFIGURATION}")
    except Exception as error:  # MLflow raises many types here (HTTP, files, JSON)
        return None, f"its {liveness.CONFIGURATION} cannot be read: {cli.first_line(error)}"
    # A run of the other script (train.py's 2D run for conv3d.py) has settings this one lacks; the
    # script that started it must agree too: a setting a newer version dropped is no refusal.
    foreign = sorted(set(logged) - {field.name for field in dataclasses.fields(type(given))})
    started_by = os.path.basename(run.data.tags.get("mlflow.source.name", ""))
    if foreign and started_by != script:
        settings = ", ".join(f"--{name.replace('_', '-')}" for name in foreign[:3])
        command = (
            f"{cli.script(started_by)} --resume {run.info.run_id}"
            if started_by.endswith(".py")
            else "the script that started it"
        )
        return None, (
            f"it is a run of {started_by or 'another script'}, not of {script} (its settings "
            f"{settings} are not {script}'s): resume it with {command}"
        )
    return logged, None


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
