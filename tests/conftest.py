import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _work_in_a_temporary_folder(tmp_path, monkeypatch):
    """MLflow's SQLite store puts artifacts in ./mlruns: keep them, and anything else, out of the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A throw-away MLflow tracking store (SQLite in tmp_path) for this test and the scripts it runs."""
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)
