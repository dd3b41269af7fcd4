"""Stores that normal use cannot break: created once under a lock, upgraded on a copy, checked."""

import os
import subprocess
import sys
import time

import mlflow
import pytest
from alembic import command
from helpers import REPO, TINY
from mlflow import MlflowClient
from mlflow.store.db import utils as db_utils

import train
from tp4.tracking import store

# What one train.py does with the store, without the training: open it, then one run.
ONE_RUN = """
import mlflow
from tp4.tracking import store
store.open_store()
mlflow.set_experiment("together")
with mlflow.start_run():
    mlflow.log_metric("m", 1.0)
"""


@pytest.mark.slow
def test_processes_started_together_in_a_fresh_folder_all_use_one_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: ./mlflow.db
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [
        subprocess.Popen([sys.executable, "-c", ONE_RUN], env=env, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    errors = [p.communicate(timeout=300)[1].decode()[-2000:] for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, errors
    client = MlflowClient(f"sqlite:///{os.path.abspath('mlflow.db')}")
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"] * 4
    assert sorted(os.listdir()) == ["mlflow.db", "mlflow.db.lock"]  # no temporary file left


def test_an_interrupt_while_the_store_is_created_leaves_no_store(monkeypatch):
    def interrupted(uri):
        with open(uri.removeprefix("sqlite:///"), "w") as half_made:
            half_made.write("some of MLflow's tables")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(store, "MlflowClient", interrupted)
        store.prepare_sqlite("mlflow.db")
    assert os.listdir() == ["mlflow.db.lock"]  # neither the store nor its temporary file
    store.prepare_sqlite("mlflow.db")  # the next command creates it
    assert MlflowClient("sqlite:///mlflow.db").get_experiment("0").name == "Default"


@pytest.mark.usefixtures("store")  # the fixture: a fresh store; `store` here: the module
def test_an_old_schema_is_upgraded_on_a_copy_and_keeps_its_runs():
    mlflow.set_experiment("kept")
    with mlflow.start_run() as run:
        mlflow.log_metric("m", 2.0)
    path = mlflow.get_tracking_uri().removeprefix("sqlite:///")
    engine = db_utils.create_sqlalchemy_engine(f"sqlite:///{path}")
    config = db_utils._get_alembic_config(f"sqlite:///{path}")
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "-1")  # the schema of the previous MLflow
    latest = db_utils._get_latest_schema_revision()
    assert db_utils._get_schema_version(engine) != latest
    engine.dispose()
    store.prepare_sqlite(path)
    engine = db_utils.create_sqlalchemy_engine(f"sqlite:///{path}")
    assert db_utils._get_schema_version(engine) == latest
    engine.dispose()
    assert MlflowClient(f"sqlite:///{path}").get_run(run.info.run_id).data.metrics == {"m": 2.0}


def test_an_unwritable_sqlite_path_fails_in_seconds_with_one_line(monkeypatch, capsys):
    open("a_file", "w").close()
    uri = f"sqlite:///{os.path.abspath('a_file')}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY)
    assert time.perf_counter() - start < 30  # MLflow alone: about 100 s of retries
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train.py: error: cannot use the MLflow tracking store {uri}: ")
    assert err.count("\n") == 1


def test_an_unwritable_artifact_location_fails_before_training(store, capsys):
    open("mlruns", "w").close()  # the store's artifacts go to ./mlruns: a file now
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "epoch" not in captured.out
    assert captured.err.startswith("train.py: error: cannot write the run's artifacts to ")
    (run,) = store.search_runs([store.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FAILED"
