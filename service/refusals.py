"""Refused connections and associations, recorded per peer address and minute.

Anyone who can reach the port can be refused as often as they like, and the audit trail may not
be deleted from; so the first refusal of an address in a minute is recorded at once (an
``associations`` row and an ``association.rejected`` event, as before), and the rest of that
minute's refusals of the address become one more row and event carrying their count and
reasons, written when the minute is over. At most two rows per address and minute, and at most
``MAX_ADDRESSES_PER_MINUTE`` addresses a minute tracked one by one (the rest share one tally).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from service.clock import Clock

LOG = logging.getLogger(__name__)
MAX_ADDRESSES_PER_MINUTE = 1000
OTHER_ADDRESSES = "*"

#: (calling AE, called AE, address, port, reason, repeated) -> writes one rejected row + event.
RecordRefusal = Callable[[str, str, str, int, str, int | None], None]


@dataclass
class _Tally:
    minute: datetime
    address: str
    repeated: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    calling: Counter[str] = field(default_factory=Counter)


class RefusalLog:
    def __init__(self, record: RecordRefusal, clock: Clock, defer: Callable[[str, Callable[[], None]], None]) -> None:
        self._record = record
        self._clock = clock
        self._defer = defer
        self._lock = threading.Lock()
        self._tallies: dict[tuple[datetime, str], _Tally] = {}

    def refused(self, calling: str, called: str, address: str, port: int, reason: str) -> None:
        minute = self._clock.now().replace(second=0, microsecond=0)
        with self._lock:
            addresses_this_minute = sum(1 for m, _ in self._tallies if m == minute)
            key = (minute, address)
            if key not in self._tallies and addresses_this_minute >= MAX_ADDRESSES_PER_MINUTE:
                key = (minute, OTHER_ADDRESSES)
            tally = self._tallies.get(key)
            first = tally is None
            if tally is None:
                self._tallies[key] = _Tally(minute, key[1])
            else:
                tally.repeated += 1
                tally.reasons[reason] += 1
                tally.calling[calling] += 1
        self.flush()
        if first:
            self._write(calling, called, key[1], port, reason, None)

    def flush(self, everything: bool = False) -> None:
        """Write the tallies of minutes that are over (or all of them, when stopping)."""
        minute = self._clock.now().replace(second=0, microsecond=0)
        with self._lock:
            due = [k for k in self._tallies if everything or k[0] < minute]
            tallies = [self._tallies.pop(k) for k in due]
        for tally in tallies:
            if tally.repeated:
                reasons = "; ".join(f"{n} x {r}" for r, n in tally.reasons.most_common(5))
                callers = ",".join(c or "-" for c, _ in tally.calling.most_common(5))
                summary = (
                    f"{tally.repeated} more refusals in the minute from {tally.minute:%Y-%m-%d %H:%M} UTC (calling {callers}): {reasons}"
                )
                self._write("", "", tally.address, 0, summary, tally.repeated)

    def _write(self, calling: str, called: str, address: str, port: int, reason: str, repeated: int | None) -> None:
        try:
            self._record(calling, called, address, port, reason, repeated)
        except Exception as exc:
            LOG.warning("cannot record refusal of %s now (%s); deferred", address, type(exc).__name__)
            self._defer(
                f"record the refusal of {address}: {reason[:80]}",
                lambda: self._record(calling, called, address, port, reason, repeated),
            )
