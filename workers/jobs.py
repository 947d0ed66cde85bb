"""Running a job: claim it, keep its lease while working, record the outcome (service/job_lifecycle.py).

A job delivered twice (broker redelivery, a stale job re-published by the assembler) runs once,
and a superseded job does not run at all. A transient failure sends the job back to ``queued``
with a backoff (the assembler publishes it again when due); after ``max_attempts`` claims, or on a
permanent error, it ends ``failed`` with its reason, where ``medcap retry`` can pick it up. A job
whose worker died counts the lost attempt too, so a study that kills workers cannot loop forever.

While the work runs, a heartbeat renews the claim's lease every third of it. If this process
dies, the lease runs out within ``lease_seconds`` (or, on this host, the next delivery sees the
process is gone) and the job is taken over: a crashed worker delays its study by seconds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from service import job_lifecycle as jobs
from service.clock import Clock
from service.database import Database
from workers.drafting import NotOurs, PermanentJobError

LOG = logging.getLogger(__name__)


class JobRunner:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        actor: str,
        lease_seconds: float = 10.0,
        *,
        max_attempts: int = 3,
        retry_delay: Callable[[int], float] = lambda attempts: 5.0 * 2 ** (attempts - 1),
        owner: str | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.actor = actor
        self.lease = timedelta(seconds=lease_seconds)
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.owner = owner or jobs.this_process()

    def claim(self, job_id: int) -> bool:
        now = self.clock.now()
        with self.db.session() as s:
            claim = jobs.claim(s, now, self.actor, job_id, self.owner, self.lease)
            if claim.claimed and claim.attempts > self.max_attempts:
                # Claimed max_attempts times already without finishing: the workers died on it.
                jobs.fail(
                    s,
                    now,
                    self.actor,
                    job_id,
                    f"abandoned by a worker {claim.attempts - 1} times (crash or time limit)",
                    owner=self.owner,
                    attempts=claim.attempts - 1,
                )
                return False
        if claim.took_over_from:
            LOG.warning("job %d: took over from %s (lease out or process gone)", job_id, claim.took_over_from)
        return claim.claimed

    def renew(self, job_id: int) -> bool:
        with self.db.session() as s:
            return jobs.renew(s, self.clock.now(), job_id, self.owner, self.lease)

    def finish(self, job_id: int, *, error: str | None = None, **details: Any) -> None:
        """Record the outcome here (tests, and work that does not commit its own success)."""
        now = self.clock.now()
        with self.db.session() as s:
            if error:
                jobs.fail(s, now, self.actor, job_id, error, owner=self.owner, **details)
            else:
                jobs.succeed(s, now, self.actor, job_id, owner=self.owner, study_uid=jobs.study_uid_of(s, job_id), **details)

    def retry_or_fail(self, job_id: int, error: str) -> str:
        """After a transient failure: back to the queue with a backoff, or failed when out of attempts."""
        now = self.clock.now()
        with self.db.session() as s:
            attempts = jobs.attempts_of(s, job_id)
            if attempts >= self.max_attempts:
                jobs.fail(s, now, self.actor, job_id, error, owner=self.owner, attempts=attempts)
                return "failed"
            jobs.retry_later(s, now, self.actor, job_id, error, self.retry_delay(attempts), owner=self.owner, attempts=attempts)
        return "retrying"

    def run(self, job_id: int, work: Callable[[int], str]) -> str:
        """Claim the job and run ``work(job_id)``, which commits the job's success itself (in the
        transaction that records its results, as this runner's owner)."""
        if not self.claim(job_id):
            return "skipped"
        stop = threading.Event()
        heartbeat = threading.Thread(target=self._keep_lease, args=(job_id, stop), name=f"lease-job-{job_id}", daemon=True)
        heartbeat.start()
        try:
            return work(job_id)
        except NotOurs:
            return "skipped"
        except PermanentJobError as exc:
            self.finish(job_id, error=str(exc))
            return "failed"
        except Exception as exc:  # transient until proven otherwise: a lost study is worse than a retry
            LOG.exception("job %d failed", job_id)
            return self.retry_or_fail(job_id, f"{type(exc).__name__}: {exc}"[:2000])
        finally:
            stop.set()
            heartbeat.join(timeout=5)

    def _keep_lease(self, job_id: int, stop: threading.Event) -> None:
        interval = self.lease.total_seconds() / 3
        while not stop.wait(interval):
            try:
                if not self.renew(job_id):
                    LOG.warning("job %d: the lease is no longer ours (taken over or finished); its result will be discarded", job_id)
                    return
            except Exception:  # a database blip: the next beat tries again; the lease has two beats of slack
                LOG.exception("job %d: cannot renew the lease", job_id)
