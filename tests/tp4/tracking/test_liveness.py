"""Runs whose process died without a word are marked KILLED by the next command; live ones stay."""

import os
import socket
import subprocess
import sys
import time

import mlflow
import psutil
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

import report
from tp4 import cli
from tp4.tracking import liveness


def _running_run(name, host, pid, heartbeat, configured=True):
    mlflow.set_experiment("e")
    tags = {"host": host, "pid": str(pid), "heartbeat": f"{heartbeat:.0f}"}
    with mlflow.start_run(run_name=name, tags=tags) as run:
        if configured:  # as the scripts do before training
            mlflow.log_dict({}, liveness.CONFIGURATION)
    mlflow.MlflowClient().set_terminated(run.info.run_id, "RUNNING")
    return run.info.run_id


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert not psutil.pid_exists(process.pid)  # reused this fast: run the test again
    return process.pid


def test_dead_runs_are_marked_killed_and_live_ones_left_alone(store):
    here, now = socket.gethostname(), time.time()
    dead = _running_run("dead", here, _dead_pid(), now)
    # A live process, but one that started after the run's last heartbeat: its pid was reused.
    reused = _running_run("reused", here, psutil.Process().pid, psutil.Process().create_time() - 5)
    stale = _running_run("stale", "elsewhere", 1, now - liveness.STALE_SECONDS - 60)
    alive = _running_run("alive", here, psutil.Process().pid, now)
    late = _running_run("late", "elsewhere", 1, now - liveness.STALE_SECONDS / 2)
    lines = liveness.mark_dead_runs(store)
    assert len(lines) == 3
    for run_id in (dead, reused, stale):
        run = store.get_run(run_id)
        assert run.info.status == "KILLED"
        assert run.data.tags["failure"].startswith("ended without a word: ")
        assert run.info.end_time == int(float(run.data.tags["heartbeat"]) * 1000)
    for run_id in (alive, late):
        assert store.get_run(run_id).info.status == "RUNNING"
    assert sorted(line.split()[2] for line in lines) == ["(dead)", "(reused)", "(stale)"]
    assert "no heartbeat from elsewhere for 11 min" in "".join(lines)


def test_report_marks_dead_runs_and_says_how_to_resume(store, capsys):
    run_id = _running_run("dead", socket.gethostname(), _dead_pid(), time.time())
    with pytest.raises(SystemExit):
        report.main(["e"])  # no finished run: exit 2, after the sweep
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run ")]
    assert line.startswith(f"run {run_id} (dead) ended without a word (process ")
    assert f"marked KILLED; continue it with: {cli.command()} " in line
    assert line.endswith(f" --resume {run_id}")
    assert store.get_run(run_id).info.status == "KILLED"


def test_a_run_of_another_pid_namespace_is_judged_by_its_heartbeat_not_its_pid(store):
    """A container with this machine's host name (docker --network host): its pids are not ours."""
    here, now, dead_here = socket.gethostname(), time.time(), _dead_pid()
    alive = _running_run("container", here, dead_here, now)
    stale = _running_run("stale container", here, dead_here, now - liveness.STALE_SECONDS - 60)
    for run_id in (alive, stale):
        store.set_tag(run_id, "pid_namespace", "pid:[1]")  # not this process's
    (line,) = liveness.mark_dead_runs(store)
    assert line.startswith(f"run {stale} (stale container) ended without a word (no heartbeat ")
    assert store.get_run(alive).info.status == "RUNNING"
    assert liveness.process_tags()["pid_namespace"] == os.readlink("/proc/self/ns/pid")


def test_a_dead_run_that_never_logged_its_configuration_is_not_offered_for_resuming(store):
    run_id = _running_run("early", socket.gethostname(), _dead_pid(), time.time(), False)
    (line,) = liveness.mark_dead_runs(store)
    assert line.startswith(f"run {run_id} (early) ended without a word (process ")
    assert line.endswith(
        "marked KILLED; it never logged its config.json (it stopped before training): "
        "start a new run"
    )
    assert store.get_run(run_id).info.status == "KILLED"


def test_a_dead_run_this_user_may_not_write_is_left_to_its_owner(store, monkeypatch):
    """What a tracking server with logins answers for another user's run (403)."""
    theirs = _running_run("theirs", socket.gethostname(), _dead_pid(), time.time())

    def forbidden(*args, **kwargs):
        raise MlflowException("Permission denied", error_code=PERMISSION_DENIED)

    monkeypatch.setattr(store, "set_tag", forbidden)
    assert liveness.mark_dead_runs(store) == []
    assert store.get_run(theirs).info.status == "RUNNING"


def test_the_heartbeat_thread_refreshes_its_tag(store):
    mlflow.set_experiment("e")
    with mlflow.start_run() as run:
        heartbeat = liveness.Heartbeat(store, run.info.run_id, seconds=0.05)
        try:
            time.sleep(0.3)
        finally:
            heartbeat.stop()
        beat = float(store.get_run(run.info.run_id).data.tags["heartbeat"])
        assert time.time() - 2 < beat <= time.time()
