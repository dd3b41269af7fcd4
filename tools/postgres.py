"""A private PostgreSQL database cluster in a folder, for tracking_server.py: create, start, stop.

Nothing on the network can reach it: it listens on a Unix socket inside its folder only (no TCP
address), and folder and socket are mode 700, so only their owner (and root) can connect; logins
through the socket therefore need no password. Run as root, PostgreSQL's programs run as the
`postgres` user: PostgreSQL refuses to run as root.
"""

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import psycopg2

SUPERUSER = "postgres"  # the cluster's administrator role, made by initdb


def bindir() -> Path:
    """The folder of PostgreSQL's server programs (initdb, pg_ctl): Debian keeps them off PATH.

    Returns:
        pg_config's bindir, else the newest /usr/lib/postgresql/*/bin, else the folder of the
        initdb on PATH, whichever has initdb and pg_ctl.
    """
    candidates = []
    if shutil.which("pg_config"):
        done = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(done.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_major_version, reverse=True)
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    for folder in candidates:
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    raise OSError("PostgreSQL's server is not installed (Debian: apt install postgresql)")


def _major_version(folder):
    """/usr/lib/postgresql/15/bin -> 15."""
    major = Path(folder).parent.name
    return int(major) if major.isdigit() else 0


def last_line(text: str) -> str:
    """The last non-empty line of a program's output or log: its error, as one line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


class Cluster:
    """A PostgreSQL database cluster in `folder`, run by the programs of `programs` (bindir())."""

    def __init__(self, programs: Path, folder: Path):
        self.programs, self.folder = programs, folder
        self.owner = _postgres_user() if os.geteuid() == 0 else None

    def exists(self) -> bool:
        return (self.folder / "PG_VERSION").exists()

    def run(self, program: str, *arguments, check: bool = True) -> int:
        """Run one of PostgreSQL's programs as the cluster's owner; returns its exit status.

        Raises:
            OSError: with the program's error as one line, if it fails and `check`.
        """
        user = {"user": self.owner.pw_uid, "group": self.owner.pw_gid, "extra_groups": []}
        done = subprocess.run(
            [self.programs / program, *arguments],
            capture_output=True,
            text=True,
            cwd=self.folder,
            **(user if self.owner else {}),
        )
        if check and done.returncode != 0:
            raise OSError(f"{program}: {last_line(done.stderr or done.stdout)}")
        return done.returncode

    def create(self) -> None:
        """initdb: UTF-8 text; logins without password through the socket, none through TCP."""
        self.folder.mkdir(mode=0o700, exist_ok=True)
        if self.owner:
            os.chown(self.folder, self.owner.pw_uid, self.owner.pw_gid)
        try:
            self.run(
                "initdb", "-D", self.folder, "-U", SUPERUSER, "--encoding=UTF8", "--no-locale",
                "--auth-local=trust", "--auth-host=reject",
            )  # fmt: skip
        except OSError as error:
            hint = " (the postgres user must be able to enter DIR and every folder above it)"
            raise OSError(f"{error}{hint if self.owner else ''}") from None

    def running(self) -> bool:
        """Whether a PostgreSQL server runs on this cluster (pg_ctl status)."""
        return self.run("pg_ctl", "status", "-D", self.folder, check=False) == 0

    def start(self) -> None:
        """Start PostgreSQL on the socket in its folder, with no TCP address; wait until ready."""
        if self.running():
            raise OSError(f"PostgreSQL already runs in {self.folder}: stop what started it first")
        log = self.folder / "postgres.log"
        options = (
            "-c listen_addresses= -c unix_socket_directories=. -c unix_socket_permissions=0700"
        )
        try:
            self.run("pg_ctl", "start", "-w", "-D", self.folder, "-l", log, "-o", options)
        except OSError:
            raise OSError(f"PostgreSQL did not start: {last_line(log.read_text())}") from None

    def stop(self) -> None:
        """A fast, clean shutdown: open sessions are ended, every committed transaction kept."""
        self.run("pg_ctl", "stop", "-m", "fast", "-D", self.folder)

    def create_role_and_databases(self, role: str, databases: tuple[str, ...]) -> None:
        """A login role owning `databases`: those of them, and the role, that do not exist yet.

        Args:
            role: name of the role (no password: it logs in through the socket).
            databases: names of the databases it owns.
        """
        connection = psycopg2.connect(host=self.folder, user=SUPERUSER, dbname="postgres")
        with contextlib.closing(connection):
            connection.autocommit = True  # CREATE DATABASE runs outside a transaction
            cursor = connection.cursor()
            cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            if not cursor.fetchone():
                cursor.execute(f'CREATE ROLE "{role}" LOGIN')
            for name in databases:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if not cursor.fetchone():
                    cursor.execute(f'CREATE DATABASE "{name}" OWNER "{role}"')

    def uri(self, role: str, database: str) -> str:
        """The SQLAlchemy URI of `database` through the socket, with the psycopg2 driver
        (SQLAlchemy 2.1's default PostgreSQL driver is psycopg 3)."""
        socket_folder = urllib.parse.quote(str(self.folder))
        return f"postgresql+psycopg2://{role}@/{database}?host={socket_folder}"


def _postgres_user():
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise OSError("PostgreSQL cannot run as root, and there is no `postgres` user") from None
