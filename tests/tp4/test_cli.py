"""tp4/cli.py. A full disk under --save-model: one line, the logged run stays FINISHED, no partial
file left. The disk is a real one where this machine lets the test mount a 2 MiB tmpfs (root),
filled up; elsewhere the write fails with an injected ENOSPC, and the test says so in a warning.
A script's end (`cli.run`): its exit status, threads, atexit handlers and output, no teardown."""

import errno
import os
import subprocess
import sys
import textwrap

import keras
import pytest
from helpers import REPO, TINY, fill, small_disk

import train


@pytest.fixture()
def full_folder(tmp_path, monkeypatch):
    """A folder on a full file system: a filled tmpfs, or (no mount allowed) an injected ENOSPC."""
    with small_disk(tmp_path / "full") as mounted:
        if mounted:
            fill(tmp_path / "full")
        else:

            def no_space(model, path, *args, **kwargs):
                with open(path, "wb") as half:
                    half.write(b"PK")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

            monkeypatch.setattr(keras.Model, "save", no_space)
        yield tmp_path / "full"


def test_save_model_on_a_full_disk_is_one_line_and_the_run_stays_finished(
    store, full_folder, capsys
):
    path = full_folder / "m.keras"
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--save-model", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"train.py: error: --save-model {path}: cannot write the model ("
    ), err
    assert err[0].endswith("the run and its model are logged in MLflow all the same")
    assert sorted(os.listdir(full_folder)) in (["filler"], [])  # no m.keras.partial.keras
    (run,) = store.search_runs([store.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED" and "model_uri" in run.data.tags


SCRIPT_END = """
import atexit, sys, threading, time
from tp4 import cli

class TornDown:
    def __del__(self):
        print("torn down")

kept = TornDown()  # freed by the interpreter's teardown only
atexit.register(lambda: print("atexit handler ran"))

def main():
    worker = threading.Thread(target=lambda: (time.sleep(0.5), print("worker finished")))
    worker.start()
    print("x" * 100_000, end="")  # still in the buffer at the end
    {end}

cli.run(main)
"""


@pytest.mark.parametrize(
    "end, status, stderr",
    [
        ("return 3", 3, ""),
        ("return None", 0, ""),
        ("raise SystemExit(2)", 2, ""),
        ('sys.exit("script.py: error: bad input")', 1, "script.py: error: bad input\n"),
    ],
)
def test_run_ends_as_sys_exit_does_without_the_teardown(end, status, stderr):
    code = textwrap.dedent(SCRIPT_END).format(end=end)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stderr) == (status, stderr)
    assert done.stdout == "x" * 100_000 + "worker finished\natexit handler ran\n"
    teardown = subprocess.run(
        [sys.executable, "-c", code.replace("cli.run(main)", "sys.exit(main())")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )  # the same script through sys.exit: the same, and then the teardown
    assert (teardown.returncode, teardown.stderr) == (status, stderr)
    assert teardown.stdout == done.stdout + "torn down\n"
