"""One process owns a run: a second one resuming it is refused in one line that names the owner."""

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from helpers import REPO, TINY, crafted_run, refused_in_one_line

from tp4.tracking import liveness, ownership, runs

# A process that owns a run's folder until its stdin closes (or it is killed).
HOLDER = """
import sys
from tp4.tracking import ownership
with ownership.own(sys.argv[1], sys.argv[2]):
    print("owned", flush=True)
    sys.stdin.read()
"""


def _holder(run_id, folder):
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, run_id, folder],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert process.stdout.readline() == "owned\n"
    return process


def test_a_resume_of_a_run_another_process_owns_is_refused_naming_it(store, capsys):
    """The two-resumes race: both found the run KILLED; the one that owns it trains, the other
    is refused before it touches the run."""
    run_id, _ = crafted_run("tiny", TINY, "KILLED")
    folder = os.path.join("checkpoints", run_id)
    holder = _holder(run_id, folder)
    try:
        line = refused_in_one_line(["--resume", run_id], capsys)
        assert line == (
            f"train.py: error: run {run_id} is being trained by process {holder.pid} on "
            f"{socket.gethostname()}: one process owns a run; wait for it to end, or stop it first"
        )
        # Past that early check (the other process took it a moment later): the run's own lock.
        with (
            pytest.raises(ownership.RunOwned),
            runs.tracked_run("tiny", "x", "checkpoints", run_id),
        ):
            pytest.fail("a second process trained the run")
        assert store.get_run(run_id).info.status == "KILLED"
        holder.send_signal(signal.SIGKILL)  # no clean-up: the kernel drops the lock
        holder.wait()
        with ownership.own(run_id, folder):  # free again
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_run_that_another_process_finished_meanwhile_is_not_resumed(store):
    run_id, _ = crafted_run("tiny", TINY, "FINISHED")  # KILLED when the command looked
    with pytest.raises(ownership.RunOwned) as refused, runs.tracked_run("tiny", "x", ".", run_id):
        pytest.fail("a FINISHED run trained again")
    assert str(refused.value) == f"run {run_id} is FINISHED: another process resumed it"
    assert store.get_run(run_id).info.status == "FINISHED"


def test_the_owner_in_another_pid_namespace_is_named_as_such(tmp_path):
    path = tmp_path / ownership.FILE
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tags = {**liveness.process_tags(), "pid": "7", "pid_namespace": "pid:[1]"}
        lock.write(json.dumps(tags))
        lock.flush()
        with pytest.raises(ownership.RunOwned) as refused, ownership.own("r1", str(tmp_path)):
            pass
    assert f"by process 7 on {socket.gethostname()} (in another PID namespace: a container)" in (
        str(refused.value)
    )


@pytest.mark.slow
def test_two_resumes_started_together_train_the_run_once(store):
    run_id, _ = crafted_run("tiny", TINY, "KILLED")
    processes = [
        subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), "--resume", run_id],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    codes = sorted(process.returncode for process in processes)
    assert codes == [0, 2], outputs
    (refusal,) = [err for process, (_, err) in zip(processes, outputs) if process.returncode]
    assert len(refusal.strip().splitlines()) == 1, refusal
    # The lock's owner named, or the RUNNING status the first one wrote: whichever came first.
    assert f"run {run_id} is being trained by " in refusal or (
        f"run {run_id} cannot be resumed: it is RUNNING (process " in refusal
    ), refusal
    assert [m.step for m in store.get_metric_history(run_id, "loss")] == [1, 2, 3]
    assert store.get_run(run_id).info.status == "FINISHED"
