"""Checkpoints that survive damage: the one before is kept, a killed save's leftovers removed."""

import os

import keras
import numpy as np
import pytest

from tp4.training import checkpoint


def _saved_epochs(folder, epochs):
    """A tiny model's checkpoints after epochs 1..`epochs` in `folder`; returns each's weights."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    saved = checkpoint.Checkpoint(str(folder), [])
    saved.set_model(model)
    saved.on_train_begin()
    weights = []
    for epoch in range(1, epochs + 1):
        model.fit(np.ones((4, 2)), np.full((4, 1), epoch), verbose=0)
        saved.save(epoch, {"loss": float(epoch)})
        weights.append(model.get_weights())
    return weights


@pytest.mark.parametrize(
    "damage, what",
    [
        (b"", "empty"),
        (None, "truncated, or not a zip archive"),  # the first half of the real file
        (os.urandom(4096), "not a checkpoint written by this project"),
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_in_one_line(
    tmp_path, capsys, damage, what
):
    weights = _saved_epochs(tmp_path, 2)
    newest = tmp_path / checkpoint.FILE
    half = newest.read_bytes()[: newest.stat().st_size // 2]
    newest.write_bytes(half if damage is None else damage)
    capsys.readouterr()
    restored = checkpoint.Checkpoint(str(tmp_path), [])
    assert capsys.readouterr().err == (
        f"{newest} is damaged ({what}): resuming from {checkpoint.PREVIOUS}, after epoch 1\n"
    )
    assert restored.epoch == 1 and restored.history == [{"loss": 1.0}]
    for array, expected in zip(restored._arrays("weights"), weights[0], strict=True):
        np.testing.assert_array_equal(array, expected)
    assert restored.read_from == str(tmp_path / checkpoint.PREVIOUS)


def test_both_checkpoints_damaged_is_one_line_that_says_what_to_do(tmp_path):
    _saved_epochs(tmp_path, 2)
    for name in (checkpoint.FILE, checkpoint.PREVIOUS):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError) as error:
        checkpoint.newest_readable(str(tmp_path))
    assert str(error.value) == (
        f"{tmp_path / checkpoint.FILE} is damaged (empty); {tmp_path / checkpoint.PREVIOUS} is "
        "damaged (empty), and no older checkpoint can be read: restore it from a backup to "
        "resume, or start a new run"
    )


def test_a_kill_between_the_two_renames_leaves_the_previous_one_to_resume_from(tmp_path, capsys):
    _saved_epochs(tmp_path, 2)
    os.remove(tmp_path / checkpoint.FILE)  # renamed to PREVIOUS; the new one not yet in place
    assert checkpoint.Checkpoint(str(tmp_path), []).epoch == 1
    assert capsys.readouterr().err == ""  # nothing is damaged


def test_the_temporary_file_of_a_killed_save_is_removed_at_the_next_save(tmp_path):
    _saved_epochs(tmp_path, 1)
    (tmp_path / "tmpab12cd.tmp").write_bytes(b"half of a checkpoint")
    _saved_epochs(tmp_path, 1)
    assert sorted(os.listdir(tmp_path)) == [checkpoint.FILE, checkpoint.PREVIOUS]


def test_restore_builds_the_optimizer_so_that_fit_traces_its_step_once(tmp_path, capsys):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    traced = []
    step = model.train_step
    model.train_step = lambda batch: traced.append(1) or step(batch)  # called once per trace
    checkpoint.Checkpoint(str(tmp_path), []).restore(model, None, epochs=2)  # nothing saved yet
    assert model.optimizer.built and "training: up to 2 epochs" in capsys.readouterr().out
    model.fit(np.ones((8, 2)), np.ones((8, 1)), batch_size=4, epochs=2, verbose=0)
    # Without the optimizer built first, its first step creates variables: traced twice.
    assert len(traced) == 1
