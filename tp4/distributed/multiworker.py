"""Multi-worker training (--strategy multiworker): the chief and the other workers.

What this module teaches: TensorFlow's MultiWorkerMirroredStrategy runs one process per worker,
described by TF_CONFIG as TensorFlow defines it (the cluster's workers, and this process's task).
Every worker runs the same program and meets the others at each collective (an all-reduce of the
gradients at every step). Here:
- the chief (task "chief", or worker 0 when there is none) alone talks to the MLflow store, keeps
  the checkpoint and saves the model;
- the other workers take what they need from the chief over the strategy's own collectives
  (`from_chief`): the run's configuration (--resume included, whatever else they were given), the
  speed choice, the checkpoint to continue from (`share_checkpoint`). They run the same script,
  logging into a scratch store of their own that is thrown away (`follow`), and wait for the chief
  to end its runs before they exit 0;
- a worker that stops (killed, crashed) stops sending heartbeats: the others' collectives abort
  within seconds, and the chief's run ends FAILED, to be resumed by starting every worker again
  (`lost_workers`). At most the epoch in progress is lost.
"""

import atexit
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable

import mlflow
import numpy as np
import tensorflow as tf

TF_CONFIG_EXAMPLE = (
    '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
    '"task": {"type": "worker", "index": 0}}'
)


def task() -> tuple[str, int, dict]:
    """(task type, index, cluster) from TF_CONFIG; ValueError if it is missing or not one."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise ValueError(
            "--strategy multiworker takes its workers from TF_CONFIG, which is not set; "
            f"for example TF_CONFIG='{TF_CONFIG_EXAMPLE}'"
        )
    try:
        config = json.loads(text)
        cluster, kind, index = (
            config["cluster"],
            config["task"]["type"],
            int(config["task"]["index"]),
        )
        known = len(cluster.get(kind, []))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"TF_CONFIG is not a cluster and a task ({error!r}): {text}") from None
    if kind not in ("chief", "worker") or not 0 <= index < known:
        raise ValueError(f"TF_CONFIG's task {kind} {index} is not a worker of its cluster: {text}")
    return kind, index, cluster


def is_chief(args) -> bool:
    """Whether this process logs to MLflow: always, but under multiworker only the chief."""
    if args.strategy != "multiworker":
        return True
    kind, index, cluster = task()
    return kind == "chief" or (index == 0 and "chief" not in cluster)


def _multi_worker(started):
    return isinstance(started, tf.distribute.MultiWorkerMirroredStrategy)


def _of_replica_zero(started, array):
    """`array` as global replica 0 (the chief's first device) has it, on every worker: the sum of
    its value and the other replicas' zeros."""

    def value(context):
        return array if context.replica_id_in_sync_group == 0 else np.zeros_like(array)

    values = started.experimental_distribute_values_from_function(value)
    return started.reduce(tf.distribute.ReduceOp.SUM, values, axis=None).numpy()


def _bytes_of_replica_zero(started, data):
    """The bytes `data` of global replica 0, on every worker."""
    size = int(_of_replica_zero(started, np.array([len(data)], np.int64))[0])
    if not size:
        return b""  # (a collective on an empty tensor crashes TensorFlow)
    words = np.zeros(-(-size // 4), np.int32)  # int32: exact through a sum, 4 bytes a number
    if data:
        words = np.frombuffer(data.ljust(4 * len(words), b"\0"), np.int32)
    return _of_replica_zero(started, words).tobytes()[:size]


def from_chief(started: tf.distribute.Strategy, compute: Callable[[], object]) -> object:
    """`compute()` on the chief, and its (JSON-able) value on every worker of a multi-worker
    strategy, where it is not computed; `compute()` everywhere else. Every worker must call it at
    the same point: it is a collective."""
    if not _multi_worker(started):
        return compute()
    chief = started.extended.should_checkpoint  # TensorFlow's own test: task 0 of the cluster
    data = json.dumps(compute()).encode() if chief else b""
    return json.loads(_bytes_of_replica_zero(started, data))


def share_checkpoint(started: tf.distribute.Strategy, saved) -> None:
    """Give every worker the chief's checkpoint (a checkpoint.Checkpoint), read from its folder: a
    worker started again continues from the chief's, whatever its own folder holds."""
    if not _multi_worker(started):
        return
    data = b""
    if started.extended.should_checkpoint and saved.read_from:
        with open(saved.read_from, "rb") as file:
            data = file.read()
    data = _bytes_of_replica_zero(started, data)
    if data and not started.extended.should_checkpoint:
        saved.load(data)


def follow(config):
    """A worker other than the chief: the same configuration, logging into a scratch store of its
    own (thrown away at exit), with no run to resume in it, no model file to save, no model to
    register: the chief does those."""
    scratch = tempfile.mkdtemp(prefix="tp4-worker-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    mlflow.set_tracking_uri(f"sqlite:///{scratch}/mlflow.db")
    # Its artifacts in the scratch folder too: by default they would go to ./mlruns.
    mlflow.create_experiment(config.experiment, artifact_location=f"{scratch}/artifacts")
    return dataclasses.replace(
        config, resume=None, save_model=None, register=None, checkpoint_dir=scratch
    )


@contextlib.contextmanager
def lost_workers():
    """A worker that stops (crashed, killed) aborts the others' collectives: one line saying so,
    instead of TensorFlow's traceback (an OSError: the chief's run is FAILED, and resumable)."""
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError) as error:
        lines = str(error).splitlines() or [type(error).__name__]
        why = next((line for line in lines if "unhealthy" in line or "reset by" in line), lines[0])
        raise WorkerLost(
            f"a worker of the cluster stopped ({why.split('aborted by: ')[-1][:200]}); start "
            "every worker again, with --resume to continue the run"
        ) from None


class WorkerLost(OSError):
    """Another worker of a multi-worker strategy stopped."""
