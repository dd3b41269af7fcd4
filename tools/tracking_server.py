"""A lab's shared MLflow tracking server in one command: PostgreSQL, artifacts in DIR, logins.

What this script teaches:
- the pieces of a shared MLflow server: a database for runs, params and metrics (PostgreSQL, the
  backend MLflow recommends beyond one user), an artifact store served through the server (clients
  need no access to its disk), basic-auth logins, and the allow-list of the names it answers to;
- a database that nothing on the network can reach: PostgreSQL listens on a Unix socket inside DIR
  only (no TCP port) that only its own user (and root) can open, so logins need no password;
- a clean life cycle: the first start creates everything in DIR, a later start reuses it and keeps
  every run; Ctrl-C or SIGTERM stops MLflow's workers, then PostgreSQL (a fast, clean shutdown).

    python -m tools.tracking_server ~/mlflow-lab  # http://127.0.0.1:5000, this machine
    python -m tools.tracking_server /srv/mlflow --host 0.0.0.0  # every address: the lab

It prints what each client sets (MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME,
MLFLOW_TRACKING_PASSWORD) and runs until Ctrl-C or SIGTERM. DIR holds postgres/ (the database
cluster and its log), artifacts/, mlflow.log, basic_auth.ini and, mode 600, flask_secret_key and
admin_password (when MLFLOW_AUTH_ADMIN_PASSWORD is not set at the first start: then a password is
generated there and printed once). Run as root, PostgreSQL runs as the `postgres` user (it refuses
root): that user must be able to reach DIR.
"""

import configparser
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tools import postgres
from tp4 import cli

ADMIN = "admin"  # the MLflow user created at the first start
ROLE = "mlflow"  # the PostgreSQL role MLflow connects as
DATABASES = ("mlflow", "mlflow_auth")  # runs, params and metrics; users and permissions
START_SECONDS = 300  # for mlflow server to answer: each worker imports MLflow (slow on 2 cores)
STOP_SECONDS = 30  # for MLflow's processes to exit on SIGTERM, before SIGKILL
EVERY_ADDRESS = ("0.0.0.0", "::")  # --host values that listen on all the machine's addresses


def parse_args(argv=None):
    parser = cli.argument_parser("tracking_server.py", __doc__, __doc__.split("\n\n")[-1])
    parser.add_argument("dir", metavar="DIR", help="folder of the server's data (created if new)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all of them)"
    )
    parser.add_argument("--port", type=int, default=5000, help="port to listen on")
    parser.add_argument("--workers", type=int, default=4, help="MLflow server processes")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536 or args.workers < 1:
        parser.error("--port must be in 1..65535 and --workers at least 1")
    return args, parser


def writable_folder(path):
    """The folder at `path`, made if new; one line if that fails or it cannot be written."""
    folder = Path(path).resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create {folder}: {error.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OSError(f"cannot write to {folder}: permission denied")
    return folder


def secret(path, make):
    """The secret in `path`, made by `make()` and written mode 600 if the file does not exist."""
    if not path.exists():
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
            file.write(make() + "\n")
    return path.read_text().strip()


def write_auth_config(lab, cluster):
    """MLflow's basic-auth settings (read through MLFLOW_AUTH_CONFIG_PATH): users and permissions
    in the same PostgreSQL; every user reads every experiment and manages their own."""
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": "READ",
        "database_uri": cluster.uri(ROLE, "mlflow_auth").replace("%", "%%"),
        "admin_username": ADMIN,
    }
    path = lab / "basic_auth.ini"
    with path.open("w") as file:
        config.write(file)
    return path


def client_names(host):
    """The names clients may use for the address the server listens on: the MLflow allow-list."""
    if host in EVERY_ADDRESS:
        name = socket.gethostname()
        try:
            addresses = socket.gethostbyname_ex(name)[2]
        except OSError:  # a name that does not resolve
            addresses = []
        names = [socket.getfqdn(), name, *addresses, "localhost", "127.0.0.1"]
    else:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:  # a name, not an address
            loopback = host == "localhost"
        names = [host, "localhost", "127.0.0.1"] if loopback else [host]
    return list(dict.fromkeys(names))  # without repeats, in order


def check_port_is_free(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.create_server((host, port), family=family).close()
    except OSError as error:
        raise OSError(f"cannot listen on {host} port {port}: {os.strerror(error.errno)}") from None


def start_mlflow(args, lab, cluster, secrets_env):
    """`mlflow server` on PostgreSQL, artifacts served from DIR, basic-auth on, answering only to
    the names of its address; in its own process group, its output in DIR/mlflow.log."""
    origins = [http_url(name, args.port) for name in client_names(args.host)]
    env = {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # GenAI jobs: 7 more processes, unused here
        **os.environ,
        **secrets_env,
        "MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(lab, cluster)),
    }
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", cluster.uri(ROLE, "mlflow"),
        "--serve-artifacts", "--artifacts-destination", (lab / "artifacts").as_uri(),
        "--app-name", "basic-auth",
        "--host", args.host, "--port", str(args.port), "--workers", str(args.workers),
        "--allowed-hosts", ",".join(origin.removeprefix("http://") for origin in origins),
        "--cors-allowed-origins", ",".join(origins),
    ]  # fmt: skip
    with (lab / "mlflow.log").open("a") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=lab, start_new_session=True
        )


def wait_until_ready(process, args, log):
    """Wait for the server's /health to answer; its error as one line if it stops first."""
    url = http_url("127.0.0.1" if args.host in EVERY_ADDRESS else args.host, args.port)
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no HTTP(S)_PROXY
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise OSError(
                f"mlflow server stopped: {postgres.last_line(log.read_text())} (see {log})"
            )
        try:
            with direct.open(f"{url}/health", timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise OSError(f"mlflow server did not answer in {START_SECONDS} s (see {log})")


def stop_process_group(process):
    """SIGTERM to the server and the workers it spawned (one process group), SIGKILL to any left
    after STOP_SECONDS."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_SECONDS
        while time.monotonic() < deadline:
            process.poll()  # reaps the leader; the group is gone when its last process is
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(args):
    """Create or reuse DIR, start PostgreSQL then MLflow, print what clients set, run until
    Ctrl-C or SIGTERM, stop both."""
    check_port_is_free(args.host, args.port)
    programs = postgres.bindir()
    lab = writable_folder(args.dir)
    cluster = postgres.Cluster(programs, lab / "postgres")
    signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl-C
    first_start = not cluster.exists()
    env = auth_secrets(lab, first_start)
    if first_start:
        cluster.create()
    cluster.start()
    try:
        cluster.create_role_and_databases(ROLE, DATABASES)
        server = start_mlflow(args, lab, cluster, env)
        try:
            wait_until_ready(server, args, lab / "mlflow.log")
            print_client_settings(public_url(args), lab, first_start)
            server.wait()
            log = lab / "mlflow.log"
            raise OSError(f"mlflow server stopped: {postgres.last_line(log.read_text())}")
        except KeyboardInterrupt:
            print("stopping MLflow, then PostgreSQL", flush=True)
        finally:
            stop_process_group(server)
    finally:
        cluster.stop()
    print(f"stopped; {lab} keeps every run", flush=True)


def auth_secrets(lab, first_start):
    """Environment variables for MLflow's basic auth: the static key that signs its forms, and the
    admin password (MLflow reads it only to create the admin user, at the first start):
    MLFLOW_AUTH_ADMIN_PASSWORD if set, else DIR/admin_password, generated at the first start."""
    env = {"MLFLOW_FLASK_SERVER_SECRET_KEY": secret(lab / "flask_secret_key", secrets.token_hex)}
    if "MLFLOW_AUTH_ADMIN_PASSWORD" not in os.environ:
        if first_start:
            secret(lab / "admin_password", lambda: secrets.token_urlsafe(18))
        if (lab / "admin_password").exists():
            env["MLFLOW_AUTH_ADMIN_PASSWORD"] = (lab / "admin_password").read_text().strip()
    return env


def http_url(host, port):
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def public_url(args):
    """The server's URL for clients: by the machine's name when it listens on all addresses."""
    return http_url(socket.gethostname() if args.host in EVERY_ADDRESS else args.host, args.port)


def print_client_settings(url, lab, first_start):
    """The URI and the variables a client sets (the admin password itself only at its creation)."""
    password_file = lab / "admin_password"
    if first_start and password_file.exists():
        password = f"{password_file.read_text().strip()}  # printed once, kept in {password_file}"
    elif password_file.exists():
        password = f"$(cat {password_file})"
    else:
        password = "...  # the MLFLOW_AUTH_ADMIN_PASSWORD of the first start"
    print(
        f"MLflow tracking server at {url} (data in {lab}, log in {lab / 'mlflow.log'})\n"
        f"A client sets:\n"
        f"  export MLFLOW_TRACKING_URI={url}\n"
        f"  export MLFLOW_TRACKING_USERNAME={ADMIN}\n"
        f"  export MLFLOW_TRACKING_PASSWORD={password}\n"
        f"The admin gives each person a login at {url}/signup. Ctrl-C stops the server.",
        flush=True,
    )


def main(argv=None):
    args, parser = parse_args(argv)
    cli.setup()
    with cli.command_line_errors(parser):
        serve(args)


if __name__ == "__main__":
    sys.exit(main())
