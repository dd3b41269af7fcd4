"""Repeated wrong passwords on tracking_server.py: locked out after a few, for a while.

MLflow's basic-auth app checks the password of every request and never slows down: a script could
try thousands a minute. This module plugs into it through its documented hook, the
`authorization_function` of basic_auth.ini (tracking_server.py sets it to `authenticate`):

- the failed logins of each (client address, user name) are counted in a small SQLite file in DIR
  that all the server's worker processes share (each worker would otherwise count apart);
- after `limit` failures in a row, that address and user get 429 Too Many Requests, with
  Retry-After, for `lockout` seconds after the last failure, without their password being checked;
  then one more try is allowed per lockout; a correct password clears the count;
- another user, or the same user from another address, is never locked out by it. Behind a reverse
  proxy every client has the proxy's address: the count is then per user.

MLflow's UI hides its change-password dialog under a custom authorization function; passwords are
then changed through the REST API (`/api/2.0/mlflow/users/update-password`) or the admin.
"""

import math
import os
import sqlite3
import threading
import time

from flask import Response, request
from mlflow.server import auth

FILE_ENV = "TP4_LOGIN_FAILURES_FILE"  # what tracking_server.py passes to mlflow server
LIMIT_ENV = "TP4_LOGIN_FAILURES_LIMIT"
LOCKOUT_ENV = "TP4_LOGIN_LOCKOUT_SECONDS"
FUNCTION = "tools.login_throttle:authenticate"  # the value of authorization_function


class Failures:
    """Failed logins by key, in a SQLite file that several processes share.

    Args:
        path: the SQLite file (created if new).
        limit: failures in a row before a lockout.
        lockout: seconds a key stays locked after its last failure.
        clock: the time in seconds (tests pass their own).
    """

    def __init__(self, path, limit, lockout, clock=time.time):
        self.path, self.limit, self.lockout, self.clock = path, limit, lockout, clock
        self._local = threading.local()

    def _db(self):
        """This thread's connection: SQLite's may not cross threads (FastAPI's middleware and
        Flask's handlers run in different ones), nor forked processes (the workers)."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.connection = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            local.connection.execute(
                "CREATE TABLE IF NOT EXISTS failures (key TEXT PRIMARY KEY, count INT, last REAL)"
            )
            local.pid = os.getpid()
        return local.connection

    def count(self, key):
        """(failures in a row, seconds left of the lockout: 0 if none) of `key`."""
        row = (
            self._db().execute("SELECT count, last FROM failures WHERE key = ?", (key,)).fetchone()
        )
        if row is None:
            return 0, 0.0
        count, last = row
        left = last + self.lockout - self.clock() if count >= self.limit else 0.0
        return count, max(left, 0.0)

    def failed(self, key):
        self._db().execute(
            "INSERT INTO failures VALUES (?, 1, ?) ON CONFLICT(key) "
            "DO UPDATE SET count = count + 1, last = excluded.last",
            (key, self.clock()),
        )

    def clear(self, key):
        self._db().execute("DELETE FROM failures WHERE key = ?", (key,))


_failures = None


def _from_environment():
    global _failures
    if _failures is None:
        _failures = Failures(
            os.environ[FILE_ENV], int(os.environ[LIMIT_ENV]), float(os.environ[LOCKOUT_ENV])
        )
    return _failures


def check(failures, key, authenticate):
    """MLflow's answer to a login, `authenticate()`, unless `key` is locked out: then 429.

    Args:
        failures: the shared counts (`Failures`).
        key: who tries: "address user".
        authenticate: MLflow's check; returns an Authorization, or a Response (401) if refused.

    Returns:
        What `authenticate` returned, or a 429 Response with Retry-After.
    """
    count, left = failures.count(key)
    if left:
        return Response(
            f"too many failed logins for {key.split(' ', 1)[1]} from this address: try again in "
            f"{math.ceil(left)} s\n",
            status=429,
            headers={"Retry-After": str(math.ceil(left))},
        )
    result = authenticate()
    if isinstance(result, Response):
        failures.failed(key)
    elif count:
        failures.clear(key)
    return result


def authenticate():
    """basic_auth.ini's authorization_function: MLflow's basic auth, with the lockout."""
    if request.authorization is None:  # no login given: MLflow asks for one, nothing to count
        return auth.authenticate_request_basic_auth()
    key = f"{request.remote_addr} {request.authorization.username}"
    return check(_from_environment(), key, auth.authenticate_request_basic_auth)
