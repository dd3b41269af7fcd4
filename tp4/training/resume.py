"""--resume: continue an interrupted run from its checkpoint, as the same MLflow run.

    python train.py --resume              # the newest unfinished run of --experiment
    python train.py --resume RUN_ID       # that run (KILLED, or FAILED without diverging)

The configuration is the run's own: the config.json it logged when it started. A flag given with
--resume that would change it is refused; flags that only say where (--experiment,
--checkpoint-dir) are free. The checkpoint is read from --checkpoint-dir/RUN_ID on this machine
(checkpoint.py); the resumed run logs the epochs the store lacks, trains on, and ends FINISHED.
"""

import argparse
import copy
import json
import os

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tp4 import cli
from tp4.training import checkpoint, divergence

NEWEST = "newest"  # --resume without a run id
PLACE_FLAGS = {"resume", "experiment", "checkpoint_dir"}  # where and which, not what is computed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--resume [RUN_ID] and --checkpoint-dir, shared by train.py and conv3d.py."""
    parser.add_argument(
        "--resume",
        nargs="?",
        const=NEWEST,
        metavar="RUN_ID",
        help="continue an interrupted run from its checkpoint, with the run's configuration: "
        "RUN_ID, or the newest unfinished run of --experiment",
    )
    parser.add_argument(
        "--checkpoint-dir",
        default="checkpoints",
        help="where each run keeps its checkpoint: DIR/<run id>/, removed when the run finishes",
    )


def configuration(
    args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]
) -> argparse.Namespace:
    """The configuration of the run to continue, with `resume` set to its run id.

    Args:
        args: the parsed command line (`resume` set); `argv` is that command line.
        parser: the script's parser, for its defaults and to tell which flags were given.

    Raises:
        ValueError: no run to resume, or a given flag would change its configuration.
    """
    client = MlflowClient()
    if args.resume == NEWEST:
        run = _newest(client, args.experiment)
    else:
        try:
            run = client.get_run(args.resume)
        except MlflowException as error:
            raise ValueError(f"no run {args.resume} in the tracking store: {error}") from None
    run_id = run.info.run_id
    reason = _not_resumable(run)
    if reason:
        raise ValueError(f"run {run_id} cannot be resumed: {reason}")
    folder = os.path.join(args.checkpoint_dir, run_id)
    if not os.path.exists(os.path.join(folder, checkpoint.FILE)) and client.get_metric_history(
        run_id, "loss"
    ):
        raise ValueError(
            f"run {run_id} has no checkpoint in {folder} (it ran on {run.data.tags.get('host')})"
        )
    try:
        config = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/config.json")
    except Exception as error:
        raise ValueError(f"run {run_id} has no readable config.json: {error}") from None
    defaults = vars(parser.parse_args([]))
    changed = [
        f"--{name.replace('_', '-')} {getattr(args, name)} (the run has {config.get(name)})"
        for name in sorted(_given(parser, argv, defaults) - PLACE_FLAGS)
        if json.loads(json.dumps(getattr(args, name))) != config.get(name)
    ]
    if changed:
        raise ValueError(
            f"--resume continues run {run_id} as it was configured: {', '.join(changed)} would "
            "change it"
        )
    config = cli.from_json(config, defaults)
    return argparse.Namespace(
        **{**defaults, **config, "resume": run_id, "checkpoint_dir": args.checkpoint_dir}
    )


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


def _given(parser, argv, defaults):
    """The destinations of the flags given in `argv`: parsed again with every default unset."""
    unset = object()
    probe = copy.deepcopy(parser)
    probe.set_defaults(**dict.fromkeys(defaults, unset))
    return {name for name, value in vars(probe.parse_args(argv)).items() if value is not unset}
