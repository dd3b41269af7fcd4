"""A lab's shared MLflow tracking server in one command: PostgreSQL, artifacts in DIR, logins.

What this script teaches:
- the pieces of a shared MLflow server: a database for runs, params and metrics (PostgreSQL, the
  backend MLflow recommends beyond one user), an artifact store served through the server (clients
  need no access to its disk), basic-auth logins, and the allow-list of the names it answers to;
- a database that nothing on the network can reach: PostgreSQL listens on a Unix socket inside DIR
  only (no TCP port) that only its own user (and root) can open, so logins need no password;
- a clean life cycle: the first start creates everything in DIR, a later start reuses it and keeps
  every run; Ctrl-C, SIGTERM or SIGHUP (a closed terminal) stops MLflow's workers, then PostgreSQL
  (a fast, clean shutdown); a start after `kill -9` stops what the killed one left running
  (tools/server_processes.py), and one DIR is served by one process at a time;
- passwords never cross a network in clear text by accident: basic auth sends them with every
  request, so listening beyond loopback needs TLS (--tls-cert/--tls-key: uvicorn serves HTTPS) or
  a TLS reverse proxy in front of a server on 127.0.0.1 (Caddy, nginx), or an explicit --insecure;
  repeated wrong passwords are locked out (tools/login_throttle.py);
- DIR is private: mode 700 (run as root: 750 with the group of `postgres`, which must enter it).

    python -m tools.tracking_server ~/mlflow-lab  # http://127.0.0.1:5000, this machine
    python -m tools.tracking_server /srv/mlflow --host 0.0.0.0 --tls-cert c.pem --tls-key k.pem
    caddy reverse-proxy --from mlflow.lab.example --to 127.0.0.1:5000  # TLS in front, instead

It prints what each client sets (MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME,
MLFLOW_TRACKING_PASSWORD) and runs until Ctrl-C, SIGTERM or SIGHUP. DIR holds postgres/ (the
database cluster and its log), artifacts/, mlflow.log, tracking_server.pid and mlflow.pid,
login_failures.sqlite, basic_auth.ini and flask_secret_key and admin_password (when
MLFLOW_AUTH_ADMIN_PASSWORD is not set at the first start: then a password is generated there and
printed once). Run as root, PostgreSQL runs as the `postgres` user (it refuses root).
"""

import configparser
import contextlib
import grp
import os
import secrets
import shlex
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tools import login_throttle, postgres, server_network, server_processes
from tp4 import cli

ADMIN = "admin"  # the MLflow user created at the first start
ROLE = "mlflow"  # the PostgreSQL role MLflow connects as
DATABASES = ("mlflow", "mlflow_auth")  # runs, params and metrics; users and permissions
START_SECONDS = 300  # for mlflow server to answer: each worker imports MLflow (slow on 2 cores)
REPO = Path(__file__).resolve().parent.parent  # on mlflow server's path: tools.login_throttle


def parse_args(argv=None):
    parser = cli.argument_parser("tracking_server.py", __doc__, __doc__.split("\n\n")[-1])
    parser.add_argument("dir", metavar="DIR", help="folder of the server's data (created if new)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all of them)"
    )
    parser.add_argument("--port", type=int, default=5000, help="port to listen on")
    parser.add_argument("--workers", type=int, default=4, help="MLflow server processes")
    parser.add_argument("--tls-cert", help="PEM certificate (chain): serve HTTPS with it")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="listen beyond loopback over plain HTTP (passwords in clear text on the network)",
    )
    parser.add_argument(
        "--max-failed-logins", type=cli.at_least(1), default=5,
        help="wrong passwords in a row (per user and address) before a lockout",
    )  # fmt: skip
    parser.add_argument(
        "--lockout", type=cli.positive, default=60.0,
        help="seconds a user and address stay locked out after their last wrong password",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536 or args.workers < 1:
        parser.error("--port must be in 1..65535 and --workers at least 1")
    return args, parser


def secure_folder(lab):
    """DIR private to its owner, also when it was made wider before: mode 700; run as root, 750
    with the group of `postgres` (which must enter it). Its artifacts and log: 700 and 600."""
    if os.geteuid() == 0:
        with contextlib.suppress(KeyError):
            os.chown(lab, -1, grp.getgrnam("postgres").gr_gid)
        lab.chmod(0o750)
    else:
        lab.chmod(0o700)
    (lab / "artifacts").mkdir(mode=0o700, exist_ok=True)
    (lab / "artifacts").chmod(0o700)
    for name in ("mlflow.log", "login_failures.sqlite"):
        os.close(os.open(lab / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        (lab / name).chmod(0o600)


def writable_folder(path):
    """The folder at `path`, made if new; one line if that fails or it cannot be written."""
    folder = Path(path).resolve()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
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
        "authorization_function": login_throttle.FUNCTION,  # basic auth, and the lockout
    }
    path = lab / "basic_auth.ini"
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
        config.write(file)
    path.chmod(0o600)  # also when an older start made it wider
    return path


def start_mlflow(args, lab, cluster, secrets_env):
    """`mlflow server` on PostgreSQL, artifacts served from DIR, basic-auth on, answering only to
    the names of its address; in its own process group, its output in DIR/mlflow.log."""
    origins = [
        server_network.http_url(name, args.port, args.tls_cert)
        for name in server_network.client_names(args.host)
    ]
    path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    env = {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # GenAI jobs: 7 more processes, unused here
        **os.environ,
        **secrets_env,
        "MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(lab, cluster)),
        "PYTHONPATH": path,
        login_throttle.FILE_ENV: str(lab / "login_failures.sqlite"),
        login_throttle.LIMIT_ENV: str(args.max_failed_logins),
        login_throttle.LOCKOUT_ENV: str(args.lockout),
    }
    tls = ["--ssl-certfile", args.tls_cert, "--ssl-keyfile", args.tls_key] if args.tls_cert else []
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", cluster.uri(ROLE, "mlflow"),
        "--serve-artifacts", "--artifacts-destination", (lab / "artifacts").as_uri(),
        "--app-name", "basic-auth",
        "--host", args.host, "--port", str(args.port), "--workers", str(args.workers),
        "--allowed-hosts", ",".join(origin.split("://")[1] for origin in origins),
        "--cors-allowed-origins", ",".join(origins),
        *(["--uvicorn-opts", shlex.join(tls)] if tls else []),
    ]  # fmt: skip
    with (lab / "mlflow.log").open("a") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=lab, start_new_session=True
        )


def wait_until_ready(process, args, log):
    """Wait for the server's /health to answer; its error as one line if it stops first."""
    url = server_network.http_url(
        "127.0.0.1" if args.host in server_network.EVERY_ADDRESS else args.host,
        args.port,
        args.tls_cert,
    )
    is_up = ssl.create_default_context()  # whether it answers, not whom: any certificate
    is_up.check_hostname, is_up.verify_mode = False, ssl.CERT_NONE
    direct = urllib.request.build_opener(  # no HTTP(S)_PROXY
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=is_up)
    )
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


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(args):
    """Check the exposure, take DIR (stopping what a killed start left), start PostgreSQL then
    MLflow, print what clients set, run until Ctrl-C, SIGTERM or SIGHUP, stop both."""
    server_network.check_exposure(args)
    programs = postgres.bindir()
    lab = Path(args.dir).resolve()
    cluster = postgres.Cluster(programs, lab / "postgres")
    with contextlib.ExitStack() as owned:
        earlier = lab.is_dir()
        if earlier:  # an earlier start's leftovers would hold the port
            owned.enter_context(server_processes.Owner(lab))
            for line in server_processes.stop_leftovers(lab, cluster):
                say(line)
        server_network.check_port_is_free(args.host, args.port)  # before a new DIR is made
        lab = writable_folder(args.dir)
        if not earlier:
            owned.enter_context(server_processes.Owner(lab))
        secure_folder(lab)
        for sig in (signal.SIGTERM, signal.SIGHUP):  # stop as on Ctrl-C
            signal.signal(sig, _interrupt)
        run_until_stopped(args, lab, cluster)


def run_until_stopped(args, lab, cluster):
    """PostgreSQL, then MLflow on it, until a signal; both stopped whatever happens."""
    first_start = not cluster.exists()
    env = auth_secrets(lab, first_start)
    if first_start:
        cluster.create()
    cluster.start()
    try:
        cluster.create_role_and_databases(ROLE, DATABASES)
        server = start_mlflow(args, lab, cluster, env)
        server_processes.record_mlflow(lab, server.pid)  # its process group
        try:
            wait_until_ready(server, args, lab / "mlflow.log")
            print_client_settings(args, lab, first_start)
            server.wait()
            log = lab / "mlflow.log"
            raise OSError(f"mlflow server stopped: {postgres.last_line(log.read_text())}")
        except KeyboardInterrupt:
            say("stopping MLflow, then PostgreSQL")
        finally:
            server_processes.stop_process_group(server.pid, server.poll)
            server_processes.forget_mlflow(lab)
    finally:
        cluster.stop()
    say(f"stopped; {lab} keeps every run")


def say(line):
    """Print a line, if anything still reads it: after SIGHUP the terminal may be gone."""
    with contextlib.suppress(OSError):
        print(line, flush=True)


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


def print_client_settings(args, lab, first_start):
    """The URI and the variables a client sets (the admin password itself only at its creation),
    and how the passwords travel."""
    url = server_network.public_url(args)
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
        f"{server_network.transport_note(args).replace('PORT', str(args.port))}\n"
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
