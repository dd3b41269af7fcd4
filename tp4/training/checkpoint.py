"""Checkpoints: after every epoch, all a run needs to continue, in one file replaced atomically.

What this module teaches:
- a checkpoint is more than weights: the optimizer's moments and step count (the step count is
  also the learning-rate schedule's position), early stopping's patience count, best score and best
  weights, the plateau schedule's state and the epochs' metrics, so that a resumed run continues the
  same curves and stops where an uninterrupted one would;
- it is written to a temporary file in the same folder, then renamed into place (os.replace,
  atomic), the one it replaces kept as checkpoint.previous.npz: a kill at any moment leaves the
  previous epoch's checkpoint or the new one, never half of one, and a newest file damaged later
  (a full disk, a bad copy) falls back to the one before it, with a line saying so; the temporary
  file of a save killed midway is removed by the next save;
- the data order: the training set is reshuffled and re-augmented from the seed at every epoch
  (data.make_dataset), each new iterator drawing the next order; a resumed run opens as many
  iterators as the done epochs did, without reading them (`restore`), and its next epoch sees the
  batches an uninterrupted run would have seen.

Keras's BackupAndRestore callback keeps weights, optimizer and epoch, but not early stopping's
state, and it writes two files one after the other.
"""

import contextlib
import glob
import io
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile

import keras
import numpy as np

from tp4.distributed import multiworker

FILE = "checkpoint.npz"
PREVIOUS = "checkpoint.previous.npz"  # the one FILE replaced: used when FILE is damaged
# What np.load and the state's JSON raise for a file that is not a whole checkpoint: empty,
# truncated (no zip directory), random bytes (NumPy then speaks of pickles), a missing array.
DAMAGED = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)
# Keras's fit opens two iterators of the training set per epoch: one when the epoch starts, and one
# when it ends, which the next epoch's start replaces unused (keras/src/trainers/epoch_iterator.py).
# tests/test_resume.py checks that a resumed run trains on the batches of an uninterrupted one.
ITERATORS_PER_EPOCH = 2
# What each stateful callback needs to go on: their on_train_begin resets it.
CALLBACK_STATE = {
    "EarlyStopping": ("wait", "best", "best_epoch", "stopped_epoch"),
    "ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
}


class Checkpoint(keras.callbacks.Callback):
    """A run's training state in `folder`/checkpoint.npz: `save` after each epoch, `restore` before
    fit. As a callback placed after `callbacks` (EarlyStopping, ReduceLROnPlateau), it gives them
    their saved state back when fit starts.

    Args:
        folder: the run's own folder (created at the first save); None keeps the state in memory
            only (a worker that follows the chief of a multi-worker strategy: distribute.py).
        callbacks: the training's callbacks; those named in CALLBACK_STATE are saved and restored.
    """

    def __init__(self, folder: str | None, callbacks: list[keras.callbacks.Callback]):
        super().__init__()
        self.folder, self.path = folder, folder and os.path.join(folder, FILE)
        self.stateful = {
            type(c).__name__: c for c in callbacks if type(c).__name__ in CALLBACK_STATE
        }
        self.state = {"epoch": 0, "stopped": False, "history": [], "fit_seconds": 0.0}
        self.arrays = {}
        self.read_from = None  # the file the state was read from (FILE, or PREVIOUS)
        if folder:
            self.read_from, note = newest_readable(folder)
            if note:
                print(note, file=sys.stderr, flush=True)
            if self.read_from:
                self.load(self.read_from)
        self.previous_fit_seconds = self.state["fit_seconds"]

    def load(self, source: str | bytes) -> None:
        """Read a checkpoint: its file, or the file's bytes (the chief's, sent to the others)."""
        self.arrays, self.state = _read(source)
        self.previous_fit_seconds = self.state["fit_seconds"]

    @property
    def epoch(self) -> int:
        """Epochs done."""
        return self.state["epoch"]

    @property
    def history(self) -> list[dict[str, float]]:
        """Each done epoch's metrics, as EpochLogger logged them."""
        return self.state["history"]

    def finished(self, epochs: int) -> bool:
        """Whether training is over: early stopping said so, or `epochs` are done."""
        return self.state["stopped"] or self.epoch >= epochs

    def last_epoch(self, epochs: int) -> int:
        """fit's `epochs`: --epochs, or the epochs done when training is over (fit then only builds
        the model's steps, and the run goes on to its evaluation)."""
        return self.epoch if self.finished(epochs) else epochs

    def restore(self, model: keras.Model, train_set, epochs: int) -> None:
        """Build `model`'s optimizer, put the saved weights and optimizer state back into it and,
        unless training is over, draw the done epochs' data orders from `train_set`; say where
        training starts."""
        multiworker.share_checkpoint(
            model.distribute_strategy, self
        )  # the chief's, on every worker
        if not self.finished(epochs):
            if self.epoch:
                print(f"resuming after epoch {self.epoch} (its checkpoint), up to {epochs}")
            else:
                plural = "s" if epochs > 1 else ""
                print(f"training: up to {epochs} epoch{plural} (the first also builds the steps)")
        # The optimizer's moments made now (mirrored across replicas, if any): a checkpoint's values
        # go into them, and fit traces its step once. A step that creates variables is traced a
        # second time without creating them: about 3 s more in the U-Net's first epoch.
        if not model.optimizer.built:
            with model.distribute_strategy.scope():
                model.optimizer.build(model.trainable_variables)
        if not self.epoch:
            return
        model.set_weights(self._arrays("weights"))
        for variable, value in zip(
            model.optimizer.variables, self._arrays("optimizer"), strict=True
        ):
            variable.assign(value)
        if not self.finished(epochs):
            for _ in range(ITERATORS_PER_EPOCH * self.epoch):
                iter(train_set)  # each new iterator draws the next shuffle and augmentation seeds

    def on_train_begin(self, logs=None):
        self.started = time.perf_counter()
        for name, callback in self.stateful.items():
            for attribute, value in self.state.get(name, {}).items():
                setattr(callback, attribute, value)
        if "best_0" in self.arrays:
            self.stateful["EarlyStopping"].best_weights = self._arrays("best")

    def save(self, epoch: int, values: dict[str, float]) -> None:
        """Write the state after `epoch` (from 1), whose metrics are `values`, atomically."""
        state = {
            "epoch": epoch,
            "stopped": bool(self.model.stop_training),
            "history": self.history[: epoch - 1] + [values],
            "fit_seconds": self.previous_fit_seconds + time.perf_counter() - self.started,
        }
        arrays = {**_numbered("weights", self.model.get_weights())}
        optimizer = [keras.ops.convert_to_numpy(v) for v in self.model.optimizer.variables]
        arrays.update(_numbered("optimizer", optimizer))
        for name, callback in self.stateful.items():
            state[name] = {a: _plain(getattr(callback, a)) for a in CALLBACK_STATE[name]}
        best = getattr(self.stateful.get("EarlyStopping"), "best_weights", None)
        arrays.update(_numbered("best", best or []))
        if self.folder:
            self._write(state, arrays)
        self.state, self.arrays = state, arrays

    def _write(self, state, arrays):
        os.makedirs(self.folder, exist_ok=True)
        for leftover in glob.glob(os.path.join(glob.escape(self.folder), "*.tmp")):
            os.remove(leftover)  # of a save killed midway (one process owns the run: ownership.py)
        with tempfile.NamedTemporaryFile(dir=self.folder, suffix=".tmp", delete=False) as file:
            try:
                np.savez(file, state=np.array(json.dumps(state)), **arrays)
                file.flush()
                os.fsync(file.fileno())  # on disk before it replaces the previous one
            except BaseException:
                os.remove(file.name)
                raise
        if os.path.exists(self.path):  # a kill between the two renames leaves PREVIOUS: read
            os.replace(self.path, os.path.join(self.folder, PREVIOUS))
        os.replace(file.name, self.path)

    def remove(self) -> None:
        """Delete the run's folder (once the run is FINISHED, all of it is in MLflow)."""
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            with contextlib.suppress(OSError):  # and --checkpoint-dir too, once empty
                os.rmdir(os.path.dirname(self.folder))

    def _arrays(self, prefix):
        count = sum(name.startswith(f"{prefix}_") for name in self.arrays)
        return [self.arrays[f"{prefix}_{i}"] for i in range(count)]


def newest_readable(folder: str) -> tuple[str | None, str]:
    """The newest checkpoint of a run's folder that can be read, and a line saying which file is
    damaged when it is not the newest.

    Args:
        folder: the run's folder.

    Returns:
        (path, note): path None when the folder holds no checkpoint, note "" when nothing is
        damaged.

    Raises:
        ValueError: checkpoints are there, and none can be read.
    """
    damaged = []
    for name in (FILE, PREVIOUS):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        try:
            epoch = _read(path)[1]["epoch"]
        except DAMAGED as error:
            damaged.append(f"{path} is damaged ({_what_is_wrong(path, error)})")
            continue
        note = f"{damaged[0]}: resuming from {name}, after epoch {epoch}" if damaged else ""
        return path, note
    if damaged:
        raise ValueError(
            f"{'; '.join(damaged)}, and no older checkpoint can be read: restore it from a "
            "backup to resume, or start a new run"
        )
    return None, ""


def _read(source):
    """The arrays and state of a checkpoint file (a path, or its bytes)."""
    with np.load(io.BytesIO(source) if isinstance(source, bytes) else source) as saved:
        arrays = {name: saved[name] for name in saved.files}
    state = json.loads(str(arrays.pop("state")))
    return arrays, state


def _what_is_wrong(path, error):
    if os.path.getsize(path) == 0:
        return "empty"
    if isinstance(error, (EOFError, zipfile.BadZipFile)):
        return "truncated, or not a zip archive"
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__
    return "not a checkpoint written by this project"  # never unpickled: it could run code


def _numbered(prefix, arrays):
    return {f"{prefix}_{i}": np.asarray(array) for i, array in enumerate(arrays)}


def _plain(value):
    """A callback attribute as JSON: NumPy and tensor scalars as Python numbers."""
    return None if value is None else np.asarray(value).item()
