"""What ``medcap studies`` shows: each study with its instances, versions and latest job."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from service import routing
from service.database import Database
from service.schema import Instance, Job, Study, StudyVersion, UTCDateTime


@dataclass(frozen=True)
class StudyStatus:
    study_uid: str
    patient_id: str | None
    accession_number: str | None
    first_received_at: datetime
    last_received_at: datetime | None
    instances: int
    pending: int
    versions: int
    latest_job_id: int | None
    latest_job_status: str | None
    skipped_series: int = 0  # series of the newest version the routing rules skipped (`medcap rules explain`)

    @property
    def state(self) -> str:
        if self.pending:
            return f"receiving ({self.pending} pending)" if not self.versions else f"receiving update ({self.pending} pending)"
        state = f"job {self.latest_job_id}: {self.latest_job_status}" if self.latest_job_id else "no job"
        return state + (f", {self.skipped_series} series skipped by rules" if self.skipped_series else "")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"state": self.state}


def list_studies(db: Database, limit: int = 50) -> list[StudyStatus]:
    with db.session() as s:
        counts = (
            select(
                Instance.study_id,
                func.count().label("instances"),
                func.count().filter(Instance.version_number.is_(None)).label("pending"),
                func.max(Instance.received_at, type_=UTCDateTime).label("last"),
            )
            .group_by(Instance.study_id)
            .subquery()
        )
        latest_version = (
            select(StudyVersion.study_id, func.max(StudyVersion.number).label("versions")).group_by(StudyVersion.study_id).subquery()
        )
        rows = s.execute(
            select(
                Study, counts.c.instances, counts.c.pending, counts.c.last, latest_version.c.versions, Job.id, Job.status, StudyVersion.id
            )
            .outerjoin(counts, counts.c.study_id == Study.id)
            .outerjoin(latest_version, latest_version.c.study_id == Study.id)
            .outerjoin(StudyVersion, (StudyVersion.study_id == Study.id) & (StudyVersion.number == latest_version.c.versions))
            .outerjoin(Job, Job.study_version_id == StudyVersion.id)
            .order_by(Study.first_received_at.desc())
            .limit(limit)
        ).all()
        skipped = routing.skipped_counts(s, [row[-1] for row in rows if row[-1] is not None])
    return [
        StudyStatus(
            study.study_uid,
            study.patient_id,
            study.accession_number,
            study.first_received_at,
            last,
            instances or 0,
            pending or 0,
            versions or 0,
            job_id,
            job_status,
            skipped.get(version_id, 0) if version_id is not None else 0,
        )
        for study, instances, pending, last, versions, job_id, job_status, version_id in rows
    ]
