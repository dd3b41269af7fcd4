import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _work_in_a_temporary_folder(tmp_path, monkeypatch):
    """MLflow's SQLite store puts artifacts in ./mlruns: keep them, and anything else, out of the checkout."""
    monkeypatch.chdir(tmp_path)
