import os
import shutil

import mlflow
import pytest
from mlflow import MlflowClient

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


@pytest.fixture(autouse=True, scope="session")
def _speed_cache_for_the_session(tmp_path_factory):
    """speed.py's measurements (`--precision auto`, `--xla auto`) cached in a folder of this test
    session: shared by its tests, never the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(autouse=True)
def _work_in_a_temporary_folder(tmp_path, monkeypatch):
    """MLflow's SQLite store puts artifacts in ./mlruns: keep them, and anything else, out of the
    checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def _empty_store_file(tmp_path_factory):
    """An SQLite file holding MLflow's tables, made once: creating them takes about a second,
    copying the file a millisecond."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def store(tmp_path, monkeypatch, _empty_store_file):
    """A throw-away MLflow tracking store (SQLite in tmp_path), for this test and the scripts it
    runs (MLFLOW_TRACKING_URI). Yields an MlflowClient of it."""
    shutil.copy(_empty_store_file, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)
