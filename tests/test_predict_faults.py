"""predict.py under faults: a silent or absent tracking server, a bad --output, a broken model."""

import socket
import time

import numpy as np
import pytest
from PIL import Image

import cli
import predict


def _run(args, capsys):
    """predict.main -> (exit code, stdout lines, stderr lines)."""
    try:
        predict.main(args)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


@pytest.fixture()
def script_defaults(monkeypatch):
    """cli.setup()'s MLflow settings as a script gets them (none set beforehand), undone after."""
    for name in cli.MLFLOW_HTTP_DEFAULTS:
        monkeypatch.setenv(name, "")  # recorded, so that what setup() sets is removed at the end
        monkeypatch.delenv(name)


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(path)
    return str(path)


@pytest.fixture()
def silent_server():
    """The address of a server that never answers: its accept queue is full (listen(0) plus one
    connection), so the kernel drops every new connection attempt, like a blackholed address."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        with socket.create_connection(server.getsockname()):
            yield "http://{}:{}".format(*server.getsockname())


@pytest.fixture()
def refusing_server():
    """The address of a port where nothing listens (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.slow
@pytest.mark.parametrize("server", ["silent_server", "refusing_server"])
def test_an_unreachable_tracking_server_fails_in_seconds(
    server, request, script_defaults, image, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", request.getfixturevalue(server))
    start = time.perf_counter()
    code, out, err = _run(["runs:/0123456789abcdef/model", image, "--output", "out"], capsys)
    elapsed = time.perf_counter() - start
    assert code == 2 and out == [] and len(err) == 1, err
    assert err[0].startswith("predict.py: error: cannot load the model runs:/0123456789abcdef")
    assert elapsed < 10, f"{elapsed:.0f} s"  # the whole command, TensorFlow's import included: < 15
    assert not (tmp_path / "out").exists()
