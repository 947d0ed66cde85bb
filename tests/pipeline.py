"""The pipeline's parts for tests: a received study's files, a drafter and a job runner built like the workers build them."""

from __future__ import annotations

from sqlalchemy import select

from dicom_io.key_slices import KeySliceSpec
from service.schema import SRDocument
from tests.conftest import series_files, storescu
from workers.drafting import Drafter, DraftOptions
from workers.jobs import JobRunner

CT = series_files("ct-head-ge")[:8]
MR = series_files("mr-t1-brain-uih")[:6]


def make_drafter(db, clock, model, settings, destinations=("ORTHANC@127.0.0.1:4242",), actor="worker:test") -> Drafter:
    options = DraftOptions(key_slices=KeySliceSpec(strategy="uniform", n=3), destinations=tuple(destinations), storage=settings.storage)
    return Drafter(db, clock, model, options, actor)


def runner(db, clock) -> JobRunner:
    return JobRunner(db, clock, "worker:test", lease_seconds=900, max_attempts=3, retry_delay=lambda n: 10.0 * n)


def draft_study(db, clock, settings, listener, assembler, captioner, files) -> int:
    """Send ``files`` to the listener, let the study settle and draft it (no destinations): the draft SR's id."""
    assert storescu(listener, files).returncode == 0
    clock.advance(settings.quiet_seconds + 1)
    (job,) = assembler.tick()
    assert runner(db, clock).run(job, make_drafter(db, clock, captioner, settings, destinations=()).draft) == "succeeded"
    with db.session() as s:
        return int(s.scalar(select(SRDocument.id).where(SRDocument.job_id == job)))
