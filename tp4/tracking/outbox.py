"""Epoch metrics sent by a background thread: a store that does not answer does not stop training.

Each epoch's values are queued with their timestamp; one thread sends them in order, one batch per
epoch, and while the store does not answer (a server gone, a SQLite file locked by another process
or on a full disk) it tries the same batch again, waiting twice as long each time (up to
LONGEST_WAIT seconds). Training never waits on the store; one line says when it stops answering,
one when it answers again (the cause's detail: faults.py). A batch sent twice (the server stored it
but its answer was lost) stores nothing twice: MLflow keeps one row per metric key, value,
timestamp and step. At the end of the run, `close(seconds)` waits for the queue to empty (`window`:
how long), trying again every CLOSING_WAIT seconds, and says how many epochs are still unsent (the
checkpoint keeps them: `--resume` sends them later).
"""

import collections
import sys
import threading
import time

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_TIMEOUT

from tp4.tracking import faults

FIRST_WAIT = 1.0
LONGEST_WAIT = 30.0
CLOSING_WAIT = 2.0  # between tries once the run has ended: the process is waiting for them
# At a run's end, the unsent epochs may wait for a tracking server ten times as long as one
# request may take (30 s with cli.py's 3 s: a server restarts in about 25 s); after Ctrl-C or
# SIGTERM, once as long: the process must end soon. A SQLite store waits SQLITE_SECONDS: another
# process holding the file's lock (a backup, `sqlite3` in a shell, a long write) is the usual
# fault there, and it ends by itself.
SEND_REQUESTS, INTERRUPTED_SEND_REQUESTS = 10, 1
SQLITE_SECONDS = 180.0


def window(uri: str, last_error: BaseException | None = None, interrupted: bool = False) -> float:
    """How long the unsent epochs of a run ending now may wait for store `uri` (seconds), given
    the store's `last_error` (a full disk does not free itself: no long wait for it)."""
    requests = INTERRUPTED_SEND_REQUESTS if interrupted else SEND_REQUESTS
    http = requests * MLFLOW_HTTP_REQUEST_TIMEOUT.get()
    if interrupted or not uri.startswith("sqlite:") or faults.is_disk_full(last_error):
        return http
    return SQLITE_SECONDS


def epochs(count: int) -> str:
    """`count` epochs, in words: "1 epoch", "3 epochs"."""
    return f"{count} epoch{'s' if count != 1 else ''}"


class Outbox:
    """Sends `put` epochs of a run's metrics in order, from a daemon thread, retrying with
    back-off."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id
        self.last_error = None  # the latest failure, for the message when epochs stay unsent
        self.failing_since = None  # while the store does not answer: since when (monotonic)
        self._queue = collections.deque()
        self._changed = threading.Condition()
        self._closing = self._abandoned = False
        self._thread = threading.Thread(target=self._send_all, name="mlflow-outbox", daemon=True)
        self._thread.start()

    def put(self, values: dict[str, float], step: int) -> None:
        """Queue one epoch's metrics, timestamped now."""
        milliseconds = int(time.time() * 1000)
        batch = [Metric(key, float(value), milliseconds, step) for key, value in values.items()]
        with self._changed:
            self._queue.append(batch)
            self._changed.notify()

    def close(self, seconds: float) -> int:
        """Wait up to `seconds` for the queued epochs to be sent, then stop sending.

        Returns:
            How many epochs were not sent.
        """
        with self._changed:
            waits = self._queue and self.failing_since is not None and not self._closing
            self._closing = True
            self._changed.notify()
            if waits:
                _say(
                    f"waiting up to {seconds:.0f} s for the tracking store to take "
                    f"{epochs(len(self._queue))}"
                )
        self._thread.join(seconds)
        with self._changed:
            self._abandoned = True
            self._changed.notify()
            return len(self._queue)

    def _send_all(self):
        wait = FIRST_WAIT
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue or self._closing or self._abandoned)
                if self._abandoned or not self._queue:
                    return
                batch, closing = self._queue[0], self._closing
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as error:  # unreachable, locked, full: the same batch again later
                self._failed(error)
                with self._changed:  # woken early when the run ends: its tries come faster
                    self._changed.wait_for(
                        lambda ended=closing: self._abandoned or self._closing != ended,
                        timeout=min(wait, CLOSING_WAIT) if closing else wait,
                    )
                wait = min(2 * wait, LONGEST_WAIT)
                continue
            wait = FIRST_WAIT
            with self._changed:
                self._queue.popleft()
                if self.failing_since is not None:
                    silent = time.monotonic() - self.failing_since
                    self.failing_since = None
                    _say(f"the tracking store answers again after {silent:.0f} s")

    def _failed(self, error):
        self.last_error = error
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            _say(
                f"the tracking store does not answer ({faults.cause(error)}): training goes on, "
                "its epochs are kept in the checkpoint and sent when it answers"
            )


def _say(line):
    print(line, file=sys.stderr, flush=True)
