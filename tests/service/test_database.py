from datetime import UTC, datetime

from sqlalchemy import func, select

from service.database import insert_ignoring_conflicts
from service.schema import Study


def test_insert_ignoring_conflicts_tells_who_inserted(db):
    row = dict(study_uid="1.2.3", first_received_at=datetime.now(UTC))
    with db.session() as s:
        assert insert_ignoring_conflicts(s, Study.__table__, row, "study_uid") is True
    with db.session() as s:
        assert insert_ignoring_conflicts(s, Study.__table__, row, "study_uid") is False
        assert s.scalar(select(func.count()).select_from(Study)) == 1
