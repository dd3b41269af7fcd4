"""A tracking server that goes away mid-run: training goes on, metrics wait, none lost or doubled.

A real `mlflow server` on 127.0.0.1, killed with SIGKILL while train.py trains, then restarted on
the same port and store. Every process the test starts is stopped by it.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import LEARNS, REPO, wait_for_line
from mlflow import MlflowClient

from tp4 import cli

EPOCHS = 10


class Server:
    """`mlflow server` in its own process group (it starts workers), on a fixed port and store."""

    def __init__(self, folder):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.folder, self.process = folder, None

    def start(self):
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--workers", "1"]
        command += ["--backend-store-uri", f"sqlite:///{self.folder}/server.db"]
        command += ["--artifacts-destination", f"{self.folder}/artifacts"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(f"{self.folder}/server.log", "a") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        pytest.fail("mlflow server did not start in 120 s")

    def kill(self):
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process:
            self.process.wait()


def _train(server, timeout, argv):
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": server.uri,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # the sender's own back-off does the waiting
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout),
    }
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _check_complete(client, experiment):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("loss", "val_dice", "epoch_seconds"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), key  # each epoch once
    assert run.data.metrics["test_dice"] > 0.5 and "model_uri" in run.data.tags
    return run


@pytest.mark.slow
def test_training_survives_a_server_blip_and_uploads_later_when_it_never_came_back(tmp_path):
    server, processes = Server(tmp_path), []
    argv = LEARNS + ["--epochs", str(EPOCHS), "--patience", str(EPOCHS)]
    try:
        server.start()
        client = MlflowClient(server.uri)

        # A blip: the server dies at epoch 2 and comes back after the last epoch.
        processes.append(_train(server, 10, argv + ["--experiment", "blip"]))
        wait_for_line(processes[-1], "epoch   2/")
        server.kill()
        wait_for_line(processes[-1], f"epoch  {EPOCHS}/")  # trained on without the server
        server.start()
        assert processes[-1].wait(timeout=120) == 0
        _check_complete(client, "blip")

        # Gone for good: the run ends with the model saved locally and one line saying what to do.
        processes.append(_train(server, 2, argv + ["--experiment", "gone"]))
        wait_for_line(processes[-1], "epoch   2/")
        server.kill()
        output = processes[-1].communicate(timeout=120)[0].strip().splitlines()
        assert processes[-1].returncode == 2
        assert output[-1].startswith(f"train.py: error: the tracking store {server.uri} does not")
        run_id = output[-1].split()[-1]
        assert output[-1].endswith(
            f"the model is saved in checkpoints/{run_id}/model.keras and the run's metrics in "
            f"checkpoints/{run_id}; send them with: {cli.script('train.py')} --resume {run_id}"
        )
        assert os.path.exists(f"checkpoints/{run_id}/model.keras")

        server.start()
        processes.append(_train(server, 10, ["--resume", run_id]))
        output = processes[-1].communicate(timeout=120)[0]
        assert processes[-1].returncode == 0, output[-3000:]
        assert f"run {run_id} (UNet_CombinedLoss_Adam) ended without a word" in output
        assert _check_complete(client, "gone").info.run_id == run_id
    finally:
        for process in processes:
            process.kill()
            process.wait()
        server.kill()
