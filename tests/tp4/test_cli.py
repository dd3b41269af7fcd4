"""A full disk under --save-model: one line, the logged run stays FINISHED, no partial file left.

The disk is a real one where this machine lets the test mount a 2 MiB tmpfs (root), filled up;
elsewhere the write fails with an injected ENOSPC, and the test says so in a warning."""

import errno
import os

import keras
import pytest
from helpers import TINY, fill, small_disk

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
