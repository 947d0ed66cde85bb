"""The dispatch state machine: every allowed and every forbidden transition, and who may write a status."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import select

from service import dispatch_lifecycle as dispatches
from service.dispatch_lifecycle import TRANSITIONS, DispatchEvent, ForbiddenTransition
from service.schema import Dispatch, DispatchStatus, Output
from tests import rows

REPO = Path(__file__).resolve().parents[2]


def make_dispatch(db, clock, status: DispatchStatus) -> int:
    now = clock.now()
    with db.session() as s:
        study = rows.study(s, now, f"1.2.{status.value}.{now.timestamp()}")
        doc = rows.draft_sr(s, now, rows.version(s, now, study), idempotency_key=f"k{study.id}", sop_instance_uid=f"2.25.{study.id}")
        output = Output(report_id=doc.id, kind="dicom-sr", media_type="application/dicom", path=doc.path, sha256=doc.sha256, created_at=now)
        s.add(output)
        s.flush()
        dispatch = Dispatch(output_id=output.id, destination="PACS@127.0.0.1:104", status=status.value, attempts=0, created_at=now)
        s.add(dispatch)
        s.flush()
        return dispatch.id


@pytest.mark.parametrize("event", list(DispatchEvent))
@pytest.mark.parametrize("status", list(DispatchStatus))
def test_every_transition_is_allowed_or_refused_as_the_table_says(db, clock, status, event):
    sources, to = TRANSITIONS[event]
    dispatch_id = make_dispatch(db, clock, status)
    with db.session() as s:
        moved = dispatches.apply(s, dispatch_id, event)
    with db.session() as s:
        now_status = s.scalar(select(Dispatch.status).where(Dispatch.id == dispatch_id))
    assert moved == (status in sources) and now_status == ((to or status) if moved else status)
    if status in sources:
        assert dispatches.target(status, event) == (to or status)
    else:
        with pytest.raises(ForbiddenTransition):
            dispatches.target(status, event)


def test_the_table_reads_as_the_diagram():
    allowed = {(e.value, a.value, (to or a).value) for e, (sources, to) in TRANSITIONS.items() for a in sources}
    assert allowed == {
        ("publish", "pending", "enqueued"),
        ("publish", "retrying", "enqueued"),
        ("republish", "enqueued", "enqueued"),
        ("republish", "sending", "sending"),
        ("claim", "pending", "sending"),
        ("claim", "enqueued", "sending"),
        ("claim", "retrying", "sending"),
        ("take_over", "sending", "sending"),
        ("deliver", "sending", "delivered"),
        ("retry", "sending", "retrying"),
        ("fail", "sending", "failed"),
        ("resend", "failed", "pending"),
        ("force_resend", "failed", "pending"),
        ("force_resend", "delivered", "pending"),
    }


#: Where each record is created and its status written: its lifecycle module, and nowhere else (the schema only declares it).
OWNERS = {"Job": "service/job_lifecycle.py", "Dispatch": "service/dispatch_lifecycle.py", "Output": "service/outputs/__init__.py"}


@pytest.mark.parametrize("record", sorted(OWNERS))
def test_only_the_lifecycle_module_writes_the_status(record):
    writes = re.compile(rf"update\({record}\)|\b{record}\(|{record}Status\.\w+\.value")
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for folder in ("service", "workers")
        for path in sorted((REPO / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if writes.search(line) and str(path.relative_to(REPO)) not in (OWNERS[record], "service/schema.py")
    ]
    assert offenders == []
