"""The processes behind tracking_server.py's DIR: one owner at a time, nothing left after a kill.

What this module teaches:
- a PID file alone lies after `kill -9` (the number may belong to another program by now); a PID
  file *locked* by its process (fcntl.flock) does not: the kernel drops the lock when the process
  dies, however it dies. DIR/tracking_server.pid is that lock (`Owner`);
- the mlflow server runs in its own process group (its workers with it), in DIR; its group id is
  in DIR/mlflow.pid. A start that finds the group still alive with no owner (the script was killed
  with `kill -9`) stops it (`stop_leftovers`), as it stops a PostgreSQL left running in
  DIR/postgres, and says so in one line each: the port is free again, with no "Address already in
  use" to puzzle over.
"""

import fcntl
import os
import signal
import time

import psutil

OWNER_FILE = "tracking_server.pid"
MLFLOW_FILE = "mlflow.pid"
STOP_SECONDS = 30  # for MLflow's processes to exit on SIGTERM, before SIGKILL


class Owner:
    """The lock on DIR/tracking_server.pid, held while this process serves DIR.

    Raises (on entering):
        OSError: another live process holds it: one line with its PID.
    """

    def __init__(self, lab):
        self.path = lab / OWNER_FILE

    def __enter__(self):
        self.file = open(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600), "r+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = self.file.read().strip() or "?"
            self.file.close()
            raise OSError(
                f"{self.path.parent} is served already by tracking_server.py PID {pid}: stop it "
                f"first (kill {pid}), or give another DIR"
            ) from None
        self.file.truncate(0)
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc_info):
        self.path.unlink(missing_ok=True)
        self.file.close()  # the lock goes with it


def stop_process_group(pgid, reap=lambda: None):
    """SIGTERM to a process group, SIGKILL to any of it left after STOP_SECONDS.

    Args:
        pgid: the group's id (its leader's PID).
        reap: called while waiting (Popen.poll: a child of ours is gone once reaped).
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_SECONDS
        while time.monotonic() < deadline:
            reap()
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def record_mlflow(lab, pgid):
    (lab / MLFLOW_FILE).write_text(f"{pgid}\n")


def forget_mlflow(lab):
    (lab / MLFLOW_FILE).unlink(missing_ok=True)


def _group_in(pgid, lab):
    """The processes of group `pgid` that run in `lab` (mlflow server's working folder)."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.cwd() == str(lab):
                found.append(process)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def stop_leftovers(lab, cluster):
    """Stop the mlflow server and PostgreSQL that an earlier start on `lab` left running.

    Call it holding `Owner`: then no live tracking_server.py owns them.

    Args:
        lab: DIR.
        cluster: DIR's postgres.Cluster.

    Returns:
        One line per thing stopped, saying what.
    """
    done = []
    pid_file = lab / MLFLOW_FILE
    if pid_file.exists():
        text = pid_file.read_text().strip()
        pgid = int(text) if text.isdigit() else 0
        if pgid and _group_in(pgid, lab):
            stop_process_group(pgid)
            done.append(f"stopped the mlflow server (process group {pgid}) of an earlier start")
        forget_mlflow(lab)
    if cluster.exists() and cluster.running():
        cluster.stop()
        done.append(f"stopped the PostgreSQL of an earlier start in {cluster.folder}")
    return done
