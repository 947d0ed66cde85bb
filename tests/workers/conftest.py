"""Fixtures for the workers' tests: a received study with its job, and the tiny model loaded once."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_io.key_slices import KeySliceSpec
from models.captioner import Captioner
from tests.conftest import series_files, storescu
from workers.drafting import Drafter, DraftOptions
from workers.jobs import JobRunner

CT = series_files("ct-head-ge")[:8]
MR = series_files("mr-t1-brain-uih")[:6]


@pytest.fixture(scope="session")
def captioner(tiny_model: Path) -> Captioner:
    return Captioner.load(tiny_model, "cpu")


@pytest.fixture
def job_id(db, listener, clock, assembler, settings) -> int:  # type: ignore[no-untyped-def]
    """The CT study received by the listener and assembled into version 1 with its job."""
    assert storescu(listener, CT).returncode == 0
    clock.advance(settings.quiet_seconds + 1)
    (created,) = assembler.tick()
    return created


def make_drafter(db, clock, model, settings, destinations=("ORTHANC@127.0.0.1:4242",), actor="worker:test") -> Drafter:  # type: ignore[no-untyped-def]
    options = DraftOptions(key_slices=KeySliceSpec(strategy="uniform", n=3), destinations=tuple(destinations), reports_dir=settings.reports_dir)
    return Drafter(db, clock, model, options, actor)


def runner(db, clock) -> JobRunner:  # type: ignore[no-untyped-def]
    return JobRunner(db, clock, "worker:test", stale_seconds=900, max_attempts=3, retry_delay=lambda n: 10.0 * n)
