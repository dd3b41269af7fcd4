"""No run RUNNING forever: a run whose process died without a word is recognized and marked KILLED.

A process can end without running any clean-up: `kill -9`, the out-of-memory killer, a power
loss. Its MLflow run would stay RUNNING forever. So a run carries tags while it runs: `host`,
`pid`, `pid_namespace`, and `heartbeat` (Unix time, refreshed every HEARTBEAT_SECONDS by a daemon
thread and at each epoch); the next command that uses the store (store.open_store) looks at every
RUNNING run:
- same host and PID namespace: dead when no process has that pid any more, or when the process
  with that pid started after the last heartbeat (the pid was reused): certain;
- another host, or another PID namespace of this one (a container: its pids are not ours, its
  host name may be): dead only when its heartbeat is older than STALE_SECONDS: clearly stale, not
  just late.
On a shared tracking server, a dead run of another user that this one may only read is left for
its owner's next command: one user's fault never blocks another.
"""

import contextlib
import os
import socket
import threading
import time

import psutil
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, ErrorCode

from tp4 import cli

CONFIGURATION = "config.json"  # logged by the scripts before training: what --resume reads back
NO_CONFIGURATION = (
    f"it never logged its {CONFIGURATION} (it stopped before training): start a new run"
)
HEARTBEAT_SECONDS = 30
STALE_SECONDS = 600  # 20 missed heartbeats


def process_tags() -> dict[str, str]:
    """The tags that tie a run to this process: host, pid, heartbeat, and the PID namespace where
    Linux has them (containers share a host name, not their pids)."""
    tags = {"host": socket.gethostname(), "pid": str(os.getpid()), "heartbeat": _now()}
    with contextlib.suppress(OSError):  # no /proc: not Linux
        tags["pid_namespace"] = os.readlink("/proc/self/ns/pid")
    return tags


def _now():
    return str(int(time.time()))


class Heartbeat:
    """A daemon thread that refreshes a run's `heartbeat` tag every `seconds`, and at once on
    `beat()`. A store that does not answer is not its concern: it tries again at the next beat."""

    def __init__(self, client: MlflowClient, run_id: str, seconds: float = HEARTBEAT_SECONDS):
        self.client, self.run_id, self.seconds = client, run_id, seconds
        self._wake, self._stopped = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-heartbeat", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()

    def _run(self):
        while True:
            self._wake.wait(self.seconds)
            self._wake.clear()
            if self._stopped.is_set():
                return
            with contextlib.suppress(Exception):  # unreachable, busy: the next beat tries again
                self.client.set_tag(self.run_id, "heartbeat", _now())


def has_configuration(client: MlflowClient, run_id: str) -> bool:
    """Whether run `run_id` logged its configuration (CONFIGURATION): without it, no --resume."""
    return any(artifact.path == CONFIGURATION for artifact in client.list_artifacts(run_id))


def death(run, now: float | None = None) -> str | None:
    """Why `run` (RUNNING) is known to be dead, or None while it may be alive (or has no tags)."""
    tags = run.data.tags
    if not {"host", "pid", "heartbeat"} <= tags.keys():
        return None
    heartbeat = float(tags["heartbeat"])
    namespace = tags.get("pid_namespace")  # absent: a run of an older version, or not Linux
    if tags["host"] == socket.gethostname() and namespace in (
        None,
        process_tags().get("pid_namespace"),
    ):
        try:
            process = psutil.Process(int(tags["pid"]))
            if process.create_time() <= heartbeat and process.status() != psutil.STATUS_ZOMBIE:
                return None
        except psutil.NoSuchProcess:
            pass
        return f"process {tags['pid']} is gone"
    silent = (now or time.time()) - heartbeat
    if silent > STALE_SECONDS:  # another machine, or another container of this one
        return f"no heartbeat from {tags['host']} for {silent / 60:.0f} min"
    return None


def mark_dead_runs(client: MlflowClient) -> list[str]:
    """Mark KILLED every RUNNING run of the store whose process is dead (`death`), except those
    this user may not write (a tracking server's other users: their own next command marks them).

    Returns:
        One line per run marked: which run, why, and how to continue it.
    """
    experiments = [e.experiment_id for e in client.search_experiments()]
    running = client.search_runs(experiments, "attributes.status = 'RUNNING'", max_results=1000)
    lines = []
    for run in running:
        reason = death(run)
        if reason is None:
            continue
        run_id = run.info.run_id
        try:
            client.set_tag(run_id, "failure", f"ended without a word: {reason}")
        except MlflowException as error:
            if error.error_code == ErrorCode.Name(PERMISSION_DENIED):
                continue  # another user's run on a shared server: theirs to mark
            raise
        client.set_terminated(
            run_id, "KILLED", end_time=int(float(run.data.tags["heartbeat"]) * 1e3)
        )
        script = os.path.basename(run.data.tags.get("mlflow.source.name", "train.py"))
        then = f"continue it with: {cli.script(script)} --resume {run_id}"
        if not has_configuration(client, run_id):
            then = NO_CONFIGURATION
        lines.append(
            f"run {run_id} ({run.info.run_name}) ended without a word ({reason}): marked KILLED; "
            f"{then}"
        )
    return lines
