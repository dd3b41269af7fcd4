"""--strategy multiworker: 2 worker processes on 127.0.0.1 train to the end, a killed worker
costs at most the epoch in progress, and Keras still needs keras_multiworker.py.

Every process a test starts is stopped when it ends, even when it fails.
"""

import json
import os
import socket
import subprocess
import sys
import time

import keras
import pytest
from helpers import REPO

LEARNS = (
    "--n-images 40 --image-size 32 --base-filters 8 --depth 3 --batch-size 4 --patience 9 "
    "--foreground 0.1 --noise 0.02 --lr 1e-2 --seed 1 --precision float32"
).split()
# Without the patch, plain Keras under the strategy: the smallest model and data that show it.
PLAIN_KERAS = """
import numpy as np, tensorflow as tf, keras
strategy = tf.distribute.MultiWorkerMirroredStrategy()
with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
model.fit(np.ones((16, 4)), np.ones((16, 1)), batch_size=8, epochs=1, verbose=0)
"""


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Cluster:
    """Worker processes of one TF_CONFIG cluster on 127.0.0.1, each in its folder, output to a
    file."""

    def __init__(self, root):
        self.root, self.processes = root, []

    def start(self, *commands, env=None):
        """One worker per command (a list of arguments for Python), worker 0 first."""
        workers = [f"127.0.0.1:{port}" for port in _free_ports(len(commands))]
        started = []
        for index, command in enumerate(commands):
            folder = self.root / f"worker{index}"
            folder.mkdir(exist_ok=True)
            task = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
            output = open(folder / f"output-{len(self.processes)}.txt", "w")  # noqa: SIM115
            process = subprocess.Popen(
                [sys.executable, *command],
                cwd=folder,
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {}).get(index, {}), "TF_CONFIG": json.dumps(task)},
            )
            process.output = output.name
            self.processes.append(process)
            started.append(process)
        return started

    def stop(self):
        for process in self.processes:
            process.kill()
            process.wait()


@pytest.fixture()
def cluster(tmp_path):
    started = Cluster(tmp_path)
    yield started
    started.stop()


def _text(process):
    with open(process.output) as file:
        return file.read()


def _wait(process, timeout=300):
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s:\n{_text(process)[-3000:]}")


def _train(*argv):
    return [str(REPO / "train.py"), *argv]


@pytest.mark.slow
def test_keras_still_needs_the_multiworker_patch(cluster):
    workers = cluster.start(["-c", PLAIN_KERAS], ["-c", PLAIN_KERAS])
    codes = [_wait(worker) for worker in workers]
    if codes == [0, 0]:
        pytest.fail(
            f"Keras {keras.__version__} trains under MultiWorkerMirroredStrategy without "
            "keras_multiworker.py (keras-team/keras#20585 fixed): delete it"
        )
    assert "Attempt to convert a value (PerReplica" in _text(workers[0])


@pytest.mark.slow
def test_two_workers_train_a_tiny_model_to_the_end(cluster, store):
    chief, worker = cluster.start(
        _train(*LEARNS, "--epochs", "4", "--strategy", "multiworker", "--experiment", "two"),
        # The other worker takes the chief's configuration, and never talks to MLflow.
        _train("--strategy", "multiworker", "--epochs", "9"),
        env={1: {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}},  # nothing listens there
    )
    assert _wait(chief) == 0, _text(chief)[-3000:]
    assert _wait(worker) == 0, _text(worker)[-3000:]
    assert "multiworker on 2 replicas, global batch 8" in _text(worker)
    assert "epoch   4/4" in _text(worker) and "epoch   5/" not in _text(worker)
    assert os.listdir(cluster.root / "worker1") == [os.path.basename(worker.output)]
    (run,) = store.search_runs([store.get_experiment_by_name("two").experiment_id])
    assert run.info.status == "FINISHED"
    expected = {"strategy": "multiworker", "replicas": "2", "global_batch_size": "8"}
    assert {key: run.data.params[key] for key in expected} == expected
    loss = [m.value for m in store.get_metric_history(run.info.run_id, "loss")]
    assert len(loss) == 4 and loss[-1] < loss[0] - 0.1  # it learned
    assert "model_uri" in run.data.tags


@pytest.mark.slow
def test_a_killed_worker_costs_at_most_the_epoch_in_progress(cluster, store):
    chief, worker = cluster.start(
        _train(*LEARNS, "--epochs", "5", "--strategy", "multiworker", "--experiment", "killed"),
        _train("--strategy", "multiworker"),
    )
    deadline = time.monotonic() + 300
    while "epoch   2/5" not in _text(chief):  # epoch 2 is checkpointed before it is printed
        assert chief.poll() is None and time.monotonic() < deadline, _text(chief)[-3000:]
        time.sleep(0.2)
    worker.kill()
    assert _wait(chief, 120) == 2  # the collectives abort once the worker's heartbeats stop
    assert "train.py: error: a worker of the cluster stopped" in _text(chief)
    (run,) = store.search_runs([store.get_experiment_by_name("killed").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"].startswith("a worker of the cluster stopped")
    done = _text(chief).count("\nepoch ")  # each epoch is checkpointed before it is printed
    assert 2 <= done < 5
    steps = [m.step for m in store.get_metric_history(run.info.run_id, "loss")]
    assert steps == list(range(1, done + 1))

    # Both started again: the chief resumes the run, the worker takes its checkpoint from it.
    chief, worker = cluster.start(
        _train("--resume", "--experiment", "killed"), _train("--strategy", "multiworker")
    )
    assert _wait(chief) == 0, _text(chief)[-3000:]
    assert _wait(worker) == 0, _text(worker)[-3000:]
    for process in (chief, worker):
        epochs = [line[:11] for line in _text(process).splitlines() if line.startswith("epoch")]
        assert epochs == [f"epoch   {e}/5" for e in range(done + 1, 6)]
    (resumed,) = store.search_runs([store.get_experiment_by_name("killed").experiment_id])
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    steps = [m.step for m in store.get_metric_history(run.info.run_id, "loss")]
    assert steps == [1, 2, 3, 4, 5]
    assert not os.path.exists(cluster.root / "worker0" / "checkpoints")  # FINISHED: all in MLflow
