"""Writes the listener could not make when it wanted to (the database was away), kept and retried.

An association's end, an audit event of a refusal, the removal of a file whose row did not
commit: each is a closure retried in order by the listener's upkeep until it succeeds. The queue
is bounded; past the bound the oldest is dropped and logged, so an outage costs memory only up
to a limit.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Write:
    what: str
    run: Callable[[], None]


class DeferredWrites:
    def __init__(self, limit: int = 10_000) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self._queue: deque[_Write] = deque()
        self._limit = limit
        self._lock = threading.Lock()
        self._running = threading.Lock()
        self.dropped = 0

    def add(self, what: str, run: Callable[[], None]) -> None:
        with self._lock:
            if len(self._queue) >= self._limit:
                lost = self._queue.popleft()
                self.dropped += 1
                LOG.error("deferred write queue full; giving up on: %s", lost.what)
            self._queue.append(_Write(what, run))
        LOG.warning("deferred until the database answers: %s", what)

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)

    def run(self) -> int:
        """Retry in order, stopping at the first failure (the database is still away); return how many remain."""
        with self._running:
            while True:
                with self._lock:
                    if not self._queue:
                        return 0
                    write = self._queue[0]
                try:
                    write.run()
                except Exception as exc:
                    LOG.warning("still cannot %s: %s", write.what, type(exc).__name__)
                    return len(self)
                with self._lock:
                    if self._queue and self._queue[0] is write:
                        self._queue.popleft()
                LOG.info("done after a delay: %s", write.what)
