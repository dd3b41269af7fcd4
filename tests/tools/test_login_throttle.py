"""tools/login_throttle.py: the lockout after repeated wrong passwords, on a clock of our own."""

import threading

from flask import Response

from tools import login_throttle

ACCEPTED = object()  # what MLflow's check returns for a right password (an Authorization)


def _refused():
    return Response(status=401)


def test_a_lockout_after_the_limit_then_one_try_per_lockout(tmp_path):
    now = [1000.0]
    failures = login_throttle.Failures(
        tmp_path / "f.sqlite", limit=3, lockout=60, clock=lambda: now[0]
    )
    key = "10.0.0.7 carol"
    for _ in range(3):
        assert login_throttle.check(failures, key, _refused).status_code == 401
    now[0] += 10
    locked = login_throttle.check(failures, key, lambda: ACCEPTED)  # even the right password
    assert locked.status_code == 429 and locked.headers["Retry-After"] == "50"
    assert "carol" in locked.get_data(as_text=True)
    # Another user, or the same from another address: not locked.
    assert login_throttle.check(failures, "10.0.0.7 bob", lambda: ACCEPTED) is ACCEPTED
    assert login_throttle.check(failures, "10.0.0.8 carol", lambda: ACCEPTED) is ACCEPTED
    now[0] += 50  # the lockout is over: one try; wrong again, locked again at once
    assert login_throttle.check(failures, key, _refused).status_code == 401
    assert login_throttle.check(failures, key, lambda: ACCEPTED).status_code == 429
    now[0] += 60
    assert login_throttle.check(failures, key, lambda: ACCEPTED) is ACCEPTED
    assert failures.count(key) == (0, 0.0)  # a right password clears the count


def test_the_counts_are_shared_by_processes_through_the_file(tmp_path):
    path, clock = tmp_path / "f.sqlite", lambda: 5.0
    first = login_throttle.Failures(path, limit=2, lockout=60, clock=clock)
    second = login_throttle.Failures(path, limit=2, lockout=60, clock=clock)  # another worker
    first.failed("a u")
    second.failed("a u")
    assert first.count("a u") == (2, 60.0)


def test_each_thread_has_its_own_connection(tmp_path):
    """FastAPI's middleware and Flask's handlers call it from different threads."""
    failures = login_throttle.Failures(tmp_path / "f.sqlite", limit=2, lockout=60)
    failures.failed("a u")
    worker = threading.Thread(target=failures.failed, args=("a u",))
    worker.start()
    worker.join()
    assert failures.count("a u")[0] == 2
