"""Epoch metrics sent by a background thread: a tracking server going away does not stop training.

Each epoch's values are queued with their timestamp; one thread sends them in order, one batch per
epoch, and while the store does not answer it tries the same batch again, waiting twice as long
each time (up to LONGEST_WAIT seconds). Training never waits on the network. A batch sent twice (the
server stored it but its answer was lost) stores nothing twice: MLflow keeps one row per metric key,
value, timestamp and step. At the end of the run, `close(seconds)` waits for the queue to empty and
says how many epochs are still unsent (the checkpoint keeps them: `--resume` sends them later).
"""

import collections
import threading
import time

from mlflow import MlflowClient
from mlflow.entities import Metric

FIRST_WAIT = 1.0
LONGEST_WAIT = 30.0


class Outbox:
    """Sends `put` epochs of a run's metrics in order, from a daemon thread, retrying with
    back-off."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id
        self.last_error = None  # the latest failure, for the message when epochs stay unsent
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
            self._closing = True
            self._changed.notify()
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
                batch = self._queue[0]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as error:  # unreachable, restarting, busy: the same batch again later
                self.last_error = error
                with self._changed:
                    self._changed.wait_for(lambda: self._abandoned, timeout=wait)
                wait = min(2 * wait, LONGEST_WAIT)
                continue
            wait = FIRST_WAIT
            with self._changed:
                self._queue.popleft()
