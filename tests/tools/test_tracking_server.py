"""tracking_server.py on 127.0.0.1: logins, train.py runs recorded, concurrent clients, restarts.

One server (PostgreSQL + mlflow server) for the module; every process it starts is stopped at the
end, even when a test fails.
"""

import base64
import grp
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from helpers import REPO
from mlflow import MlflowClient
from mlflow.server.auth.client import AuthServiceClient
from mlflow.tracking._tracking_service.client import TrackingServiceClient

import report
from tools import postgres, server_processes, tracking_server
from tp4.tracking import liveness, runs, store

TINY = (
    "--n-images 40 --image-size 32 --base-filters 8 --depth 3 --epochs 1 --batch-size 8 "
    "--foreground 0.1 --seed 1 --precision float32 --xla off"
).split()
READY = "Ctrl-C stops the server."


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """tracking_server.py run as a process: its DIR, URL, printed lines, and a clean stop."""

    def __init__(self, lab):
        self.lab, self.port = lab, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process, self.children = None, []

    def start(self):
        self.output = self.lab.parent / f"server-{time.monotonic_ns()}.out"
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_AUTH_ADMIN_PASSWORD"}
        command = [
            sys.executable,
            "-m",
            "tools.tracking_server",
            self.lab,
            "--port",
            str(self.port),
        ]
        with self.output.open("w") as out:
            self.process = subprocess.Popen(
                [*command, "--workers", "2"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        deadline = time.monotonic() + 300
        while READY not in self.text() and self.process.poll() is None:
            assert time.monotonic() < deadline, self.text()
            time.sleep(0.5)
        assert self.process.poll() is None, self.text()

    def text(self):
        return self.output.read_text()

    def credentials(self):
        password = (self.lab / "admin_password").read_text().strip()
        return {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}

    def stop(self, sig=signal.SIGTERM):
        """SIGTERM, as a service manager would (or `sig`); then make sure that nothing it started
        is left. Returns its exit status."""
        if self.process.poll() is None:
            # mlflow server and its workers are its children; PostgreSQL is a daemon.
            self.children = psutil.Process(self.process.pid).children(recursive=True)
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=120)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            for child in self.children:
                if child.is_running():
                    child.kill()
            if (self.lab / "postgres" / "postmaster.pid").exists():
                postgres.Cluster(postgres.bindir(), self.lab / "postgres").stop()


@pytest.fixture(scope="module")
def server():
    # Run as root, PostgreSQL runs as `postgres`, which must be able to enter DIR: pytest's own
    # temporary folders are mode 700.
    base = Path(tempfile.mkdtemp(prefix="tracking-server-"))
    base.chmod(0o711)
    server = Server(base / "lab")
    try:
        server.start()
        yield server
    finally:
        if server.process:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture()
def client(server, monkeypatch):
    for name, value in server.credentials().items():
        monkeypatch.setenv(name, value)
    return MlflowClient(server.url)


def _status(url, user=None, password=None, host=None):
    request = urllib.request.Request(url)
    if user:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    if host:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _train(server, experiment, *flag_sets, credentials=None):
    """train.py with the server's credentials (admin's, or `credentials`), one process per set of
    flags, all at once; each must succeed. Stops any left when a test fails."""
    login = credentials or server.credentials()
    env = {**os.environ, **login, "MLFLOW_TRACKING_URI": server.url}
    command = [sys.executable, REPO / "train.py", *TINY, "--experiment", experiment]
    processes = [
        subprocess.Popen(
            [*command, *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for flags in flag_sets
    ]
    try:
        for process in processes:
            output = process.communicate(timeout=900)[0]
            assert process.returncode == 0, output[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def _every_run(client):
    experiments = [e.experiment_id for e in client.search_experiments()]
    return {run.info.run_id for run in client.search_runs(experiments, max_results=1000)}


@pytest.mark.slow
def test_the_first_start_prints_the_client_settings_and_the_password_once(server):
    password = server.credentials()["MLFLOW_TRACKING_PASSWORD"]
    assert f"export MLFLOW_TRACKING_URI={server.url}\n" in server.text()
    assert "export MLFLOW_TRACKING_USERNAME=admin\n" in server.text()
    assert f"export MLFLOW_TRACKING_PASSWORD={password}  # printed once" in server.text()
    assert (server.lab / "admin_password").stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_requests_without_the_right_login_or_for_another_host_are_refused(server):
    search = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    password = server.credentials()["MLFLOW_TRACKING_PASSWORD"]
    assert _status(search) == 401
    assert _status(search, "admin", password + "x") == 401
    assert _status(search, "admin", password) == 200
    assert _status(search, "admin", password, host=f"evil.example:{server.port}") == 403


@pytest.mark.slow
def test_train_py_with_credentials_is_recorded_with_its_artifacts_in_dir(server, client):
    _train(server, "lab", ["--loss", "dice"])
    (run,) = client.search_runs([client.get_experiment_by_name("lab").experiment_id])
    assert (run.info.run_name, run.info.status) == ("UNet_DiceLoss_Adam", "FINISHED")
    assert run.data.params["loss"] == "DiceLoss"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_dice")] == [1]
    assert "config.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    stored = list((server.lab / "artifacts").rglob(f"{run.info.run_id}/artifacts/config.json"))
    assert len(stored) == 1  # served from DIR: the client never wrote there itself


@pytest.mark.slow
def test_four_concurrent_trainings_are_all_recorded(server, client):
    # Four of the grid's 24 shards at once, one cell each (the first 4: BCE x every optimizer).
    _train(server, "concurrent", *(["--grid", "--shard", f"{i}/24"] for i in range(4)))
    runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id])
    names = {f"UNet_BCELoss_{optimizer}" for optimizer in ("Adam", "AdamW", "RMSprop", "SGD")}
    assert sorted(run.info.run_name for run in runs) == sorted(names)
    assert {run.info.status for run in runs} == {"FINISHED"}
    for run in runs:
        assert len(client.get_metric_history(run.info.run_id, "val_dice")) == 1


@pytest.mark.slow
def test_another_users_dead_run_blocks_nothing_for_a_reader(server, client, monkeypatch, capsys):
    """admin's run died (a heartbeat that stopped long ago, on another machine); bob, who may only
    read it, still opens the store, reports and trains in his own experiment; admin's next command
    marks it KILLED."""
    silent_since = int(time.time()) - liveness.STALE_SECONDS - 60
    tags = {"host": "elsewhere", "pid": "1", "heartbeat": str(silent_since)}
    dead = client.create_run(client.create_experiment("admins"), tags=tags).info.run_id
    AuthServiceClient(server.url).create_user("bob", "bob-password")  # READ: the default
    bob = {"MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "bob-password"}
    for name, value in {**bob, "MLFLOW_TRACKING_URI": server.url}.items():
        monkeypatch.setenv(name, value)

    store.open_store()
    report.main(["admins", "--all"])
    captured = capsys.readouterr()
    assert captured.err == "" and "RUNNING" in captured.out
    _train(server, "bobs", [], credentials=bob)
    (trained,) = client.search_runs([client.get_experiment_by_name("bobs").experiment_id])
    assert trained.info.status == "FINISHED"
    assert client.get_run(dead).info.status == "RUNNING"  # not bob's to mark

    for name, value in server.credentials().items():
        monkeypatch.setenv(name, value)
    (line,) = liveness.mark_dead_runs(client)
    assert line.startswith(f"run {dead} ") and client.get_run(dead).info.status == "KILLED"


@pytest.mark.slow
def test_a_restart_on_the_same_dir_keeps_every_run_and_stops_every_process(server, client):
    experiment = client.create_experiment("restart")
    kept = client.create_run(experiment).info.run_id
    client.log_metric(kept, "dice", 0.5)
    client.log_text(kept, "kept", "note.txt")
    client.set_terminated(kept)
    before = _every_run(client)

    assert server.stop() == 0
    assert server.text().splitlines()[-1].startswith("stopped;")
    assert not any(child.is_running() for child in server.children)
    assert not (server.lab / "postgres" / "postmaster.pid").exists()

    server.start()
    assert "# printed once" not in server.text()
    assert _every_run(client) == before
    assert client.get_metric_history(kept, "dice")[0].value == 0.5
    assert client.download_artifacts(kept, "note.txt", str(server.lab.parent)) is not None
    assert (server.lab.parent / "note.txt").read_text() == "kept"


def test_a_run_goes_to_its_experiment_when_another_process_creates_it_at_the_same_time(
    store, monkeypatch, tmp_path
):
    """Four trainings starting at once race to create their experiment: MLflow's set_experiment
    then returns it without making it active. Here the race is lost on purpose: the experiment
    appears between set_experiment's lookup and its create."""
    winner = store.create_experiment("raced")
    lookup = TrackingServiceClient.get_experiment_by_name
    lookups = []

    def not_yet_created(self, name):
        lookups.append(name)
        return None if len(lookups) == 1 else lookup(self, name)

    monkeypatch.setattr(TrackingServiceClient, "get_experiment_by_name", not_yet_created)
    with runs.tracked_run("raced", "late", str(tmp_path / "checkpoints")) as run:
        pass
    assert lookups == ["raced", "raced"]  # the race happened
    assert run.info.experiment_id == winner


def test_a_port_in_use_is_one_line_and_creates_nothing(tmp_path, capsys):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            tracking_server.main([str(tmp_path / "lab"), "--port", str(port)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"tracking_server.py: error: cannot listen on 127.0.0.1 port {port}: "
        f"Address already in use (another program: `ss -ltnp 'sport = :{port}'` names it; or "
        "give another --port)\n"
    )
    assert not (tmp_path / "lab").exists()


def test_a_dir_that_cannot_be_written_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        tracking_server.main([str(tmp_path / "file" / "lab"), "--port", str(_free_port())])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"tracking_server.py: error: cannot create {tmp_path / 'file' / 'lab'}: Not a directory\n"
    )


def test_a_read_only_dir_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "lab").mkdir(mode=0o500)
    monkeypatch.setattr(tracking_server.os, "access", lambda path, mode: False)  # root too
    with pytest.raises(SystemExit) as exit_info:
        tracking_server.main([str(tmp_path / "lab"), "--port", str(_free_port())])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"tracking_server.py: error: cannot write to {tmp_path / 'lab'}: permission denied\n"
    )


def test_a_missing_postgresql_names_the_package_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(postgres.shutil, "which", lambda name: None)
    monkeypatch.setattr(postgres.glob, "glob", lambda pattern: [])
    with pytest.raises(SystemExit) as exit_info:
        tracking_server.main([str(tmp_path / "lab"), "--port", str(_free_port())])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "tracking_server.py: error: PostgreSQL's server is not installed "
        "(Debian: apt install postgresql)\n"
    )


@pytest.mark.slow
def test_a_second_server_on_a_served_dir_is_refused_naming_the_first(server, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tracking_server.main([str(server.lab), "--port", str(_free_port())])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"tracking_server.py: error: {server.lab} is served already by tracking_server.py PID "
        f"{server.process.pid}: stop it first (kill {server.process.pid}), or give another DIR\n"
    )


@pytest.mark.slow
def test_dir_is_private_to_its_owner(server):
    if os.geteuid() == 0:  # PostgreSQL runs as `postgres`, which must enter DIR
        assert server.lab.stat().st_mode & 0o777 == 0o750
        assert server.lab.stat().st_gid == grp.getgrnam("postgres").gr_gid
    else:
        assert server.lab.stat().st_mode & 0o777 == 0o700
    assert (server.lab / "artifacts").stat().st_mode & 0o777 == 0o700
    for name in ("mlflow.log", "login_failures.sqlite", "basic_auth.ini"):
        assert (server.lab / name).stat().st_mode & 0o077 == 0, name


def _request(url, method="GET", user=None, password=None, body=None):
    """(status, headers) of one request with basic auth."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if user:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.headers


@pytest.mark.slow
def test_repeated_wrong_passwords_lock_out_that_user_only(server):
    admin = server.credentials()["MLFLOW_TRACKING_PASSWORD"]
    create = f"{server.url}/api/2.0/mlflow/users/create"
    body = {"username": "carol", "password": "carol-right-1234"}
    assert _request(create, "POST", "admin", admin, body)[0] == 200
    search = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _request(search, user="carol", password="carol-right-1234")[0] == 200
    for _ in range(5):  # --max-failed-logins 5
        assert _request(search, user="carol", password="wrong")[0] == 401
    status, headers = _request(search, user="carol", password="carol-right-1234")
    assert status == 429 and 55 <= int(headers["Retry-After"]) <= 60  # --lockout 60
    assert _request(search, user="admin", password=admin)[0] == 200  # another user: not locked


@pytest.mark.slow
def test_sighup_stops_everything_and_a_start_after_kill_9_stops_the_leftovers(server, client):
    assert server.stop(signal.SIGHUP) == 0  # a closed terminal
    assert server.text().splitlines()[-1].startswith("stopped;")
    assert not any(child.is_running() for child in server.children)
    assert not (server.lab / "postgres" / "postmaster.pid").exists()

    server.start()
    mlflow_group = int((server.lab / "mlflow.pid").read_text())
    left = psutil.Process(server.process.pid).children(recursive=True)
    server.process.kill()  # kill -9: mlflow server (its own session) and PostgreSQL stay
    server.process.wait()
    assert any(process.is_running() for process in left)
    assert (server.lab / "postgres" / "postmaster.pid").exists()

    server.start()  # on the same port: the leftovers held it
    assert f"stopped the mlflow server (process group {mlflow_group}) of an earlier start\n" in (
        server.text()
    )
    assert f"stopped the PostgreSQL of an earlier start in {server.lab / 'postgres'}\n" in (
        server.text()
    )
    assert not any(process.is_running() for process in left)
    assert client.search_experiments()  # the new server answers


def test_listening_beyond_loopback_without_tls_is_one_line_before_anything_is_made(
    tmp_path, capsys
):
    with pytest.raises(SystemExit) as exit_info:
        tracking_server.main([str(tmp_path / "lab"), "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "Caddy" in err and "nginx" in err and "--insecure" in err
    assert not (tmp_path / "lab").exists()


def test_one_owner_per_dir(tmp_path):
    with server_processes.Owner(tmp_path):
        assert (tmp_path / "tracking_server.pid").read_text() == f"{os.getpid()}\n"
        with (
            pytest.raises(OSError, match=f"served already by tracking_server.py PID {os.getpid()}"),
            server_processes.Owner(tmp_path),
        ):
            pass
    assert not (tmp_path / "tracking_server.pid").exists()
    with server_processes.Owner(tmp_path):  # free again
        pass
