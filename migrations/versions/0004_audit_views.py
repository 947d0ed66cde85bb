"""audit views: the admins' questions as SQL views

Revision ID: 0004
Revises: 0003
Views for admins who query the database directly (docs/audit.md), and that the admin pages,
``medcap audit`` and service/audit_queries.py read too, so both give the same numbers:

* ``v_audit_trail``: audit events with the study's accession number and patient;
* ``v_drafts``: one row per draft SR with its model, study and review decision;
* ``v_turnaround``: one row per study with a draft: received, drafted (its newest draft), approved, and the seconds between;
* ``v_turnaround_by_model``: median and 90th percentile of those per model version;
* ``v_model_quality``: per model version, the share of drafts approved unchanged and the edit distance;
* ``v_failed_work``: failed jobs and failed dispatches, what ``medcap retry`` / ``medcap resend`` act on.

The SQL is the same on both backends but for two things: the seconds between two times, and the
percentiles. Percentiles are nearest-rank (the smallest value with at least p % of the values at
or below it): PostgreSQL's percentile_disc, and on SQLite (3.25+) the same written with window
functions. Views are not models: the schema comparison in tests/migrations does not see them.
No index is added: benchmarks/audit_queries.py (one million audit events) found the existing ones
enough for every documented query; what is slow there is aggregating all studies, which no index
avoids (see benchmarks/README.md).

Later migrations that rebuild one of the underlying tables on SQLite (batch "move and copy")
must drop these views first and create them again afterwards.
"""

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MODEL = "model_name, model_version, weights_sha256"


def _seconds(dialect: str, start: str, end: str) -> str:
    """Seconds from ``start`` to ``end``, to the millisecond, as a double on both backends."""
    if dialect == "postgresql":
        return f"CAST(ROUND(EXTRACT(EPOCH FROM ({end}) - ({start})), 3) AS DOUBLE PRECISION)"
    return f"ROUND((julianday({end}) - julianday({start})) * 86400.0, 3)"


def _nearest_rank(rank: str, n: str, value: str, percent: int) -> str:
    """The ``percent``-th percentile, nearest-rank: the value at rank ceil(percent/100 * n)."""
    return f"MAX(CASE WHEN {rank} = ({percent} * {n} + 99) / 100 THEN {value} END)"


def _percentile(value: str, percent: int) -> str:
    """PostgreSQL's percentile_disc is nearest-rank too (the first value whose position reaches the fraction), and cheaper."""
    return f"percentile_disc({percent / 100}) WITHIN GROUP (ORDER BY {value})"


def _turnaround_by_model(dialect: str) -> str:
    names = [("draft", "draft_seconds", "n"), ("approval", "approval_seconds", "approved_n"), ("total", "total_seconds", "approved_n")]
    if dialect == "postgresql":
        columns = ",\n                   ".join(
            f"{_percentile(value, p)} AS {name}_{label}_seconds" for name, value, _ in names for p, label in ((50, "median"), (90, "p90"))
        )
        return f"""
            SELECT {MODEL}, COUNT(*) AS studies, COUNT(approval_seconds) AS approved,
                   {columns}
            FROM v_turnaround
            GROUP BY {MODEL}"""
    columns = ",\n                   ".join(
        f"{_nearest_rank(f'{name}_rank', n, value, p)} AS {name}_{label}_seconds"
        for name, value, n in names
        for p, label in ((50, "median"), (90, "p90"))
    )
    return f"""
            WITH ranked AS (
                SELECT {MODEL}, draft_seconds, approval_seconds, total_seconds,
                       ROW_NUMBER() OVER (PARTITION BY {MODEL} ORDER BY draft_seconds) AS draft_rank,
                       ROW_NUMBER() OVER (PARTITION BY {MODEL} ORDER BY approval_seconds IS NULL, approval_seconds) AS approval_rank,
                       ROW_NUMBER() OVER (PARTITION BY {MODEL} ORDER BY total_seconds IS NULL, total_seconds) AS total_rank,
                       COUNT(*) OVER (PARTITION BY {MODEL}) AS n,
                       COUNT(approval_seconds) OVER (PARTITION BY {MODEL}) AS approved_n
                FROM v_turnaround
            )
            SELECT {MODEL}, COUNT(*) AS studies, MAX(approved_n) AS approved,
                   {columns}
            FROM ranked
            GROUP BY {MODEL}"""


def _model_quality(dialect: str) -> str:
    if dialect == "postgresql":
        source = "v_drafts"
        median = _percentile("CASE WHEN decision = 'approved' THEN edit_distance END", 50)
    else:
        source = f"""(
                SELECT {MODEL}, decision, edited, edit_distance, draft_characters,
                       ROW_NUMBER() OVER (PARTITION BY {MODEL}, decision ORDER BY edit_distance) AS edit_rank,
                       COUNT(*) OVER (PARTITION BY {MODEL}, decision) AS in_decision
                FROM v_drafts
            ) ranked"""
        median = "MAX(CASE WHEN decision = 'approved' AND edit_rank = (in_decision + 1) / 2 THEN edit_distance END)"
    return f"""
            SELECT {MODEL},
                   COUNT(*) AS drafts,
                   COUNT(decision) AS reviewed,
                   SUM(CASE WHEN decision = 'approved' THEN 1 ELSE 0 END) AS approved,
                   SUM(CASE WHEN decision = 'approved' AND NOT edited THEN 1 ELSE 0 END) AS approved_unchanged,
                   SUM(CASE WHEN decision = 'rejected' THEN 1 ELSE 0 END) AS rejected,
                   CAST(SUM(CASE WHEN decision = 'approved' AND NOT edited THEN 1 ELSE 0 END) AS DOUBLE PRECISION)
                       / NULLIF(COUNT(decision), 0) AS approved_unchanged_rate,
                   AVG(CASE WHEN decision = 'approved' THEN CAST(edit_distance AS DOUBLE PRECISION) END) AS mean_edit_distance,
                   {median} AS median_edit_distance,
                   AVG(CASE WHEN decision = 'approved' AND draft_characters > 0
                            THEN CAST(edit_distance AS DOUBLE PRECISION) / draft_characters END) AS normalised_edit_distance
            FROM {source}
            GROUP BY {MODEL}"""


def views(dialect: str) -> dict[str, str]:
    """name -> SELECT, in creation order (later views read earlier ones)."""
    return {
        "v_audit_trail": """
            SELECT e.id, e.at, e.actor, e.action, e.object_type, e.object_id, e.study_uid,
                   st.accession_number, st.patient_id, st.patient_name, e.details
            FROM audit_events e
            LEFT JOIN studies st ON st.study_uid = e.study_uid""",
        # The model of a draft SR is that of its first series' draft (one SR, one model). NOT EXISTS
        # rather than MIN(): PostgreSQL plans it as a hash anti-join over all drafts, or as an index
        # lookup per row when a query wants only a page of them.
        "v_drafts": """
            SELECT sr.id AS draft_sr_id, sr.sop_instance_uid AS draft_sr_uid, st.id AS study_id, st.study_uid,
                   st.accession_number, st.patient_id, st.patient_name, sv.number AS study_version,
                   d.model_name, d.model_version, d.weights_sha256,
                   st.first_received_at AS received_at, sr.created_at AS drafted_at,
                   r.decision, r.decided_at, u.username AS reviewer, r.edited, r.edit_distance, r.draft_characters,
                   v.sop_instance_uid AS verified_sr_uid
            FROM sr_documents sr
            JOIN studies st ON st.id = sr.study_id
            JOIN study_versions sv ON sv.id = sr.study_version_id
            JOIN drafts d ON d.sr_document_id = sr.id
            LEFT JOIN reviews r ON r.draft_sr_id = sr.id
            LEFT JOIN users u ON u.id = r.reviewer_id
            LEFT JOIN sr_documents v ON v.id = r.verified_sr_id
            WHERE sr.kind = 'draft'
              AND NOT EXISTS (SELECT 1 FROM drafts d0 WHERE d0.sr_document_id = sr.id AND d0.id < d.id)""",
        # Per study, its newest draft (that of its latest version with one): what the study's report
        # is, or will be, made from.
        "v_turnaround": f"""
            SELECT t.study_uid, t.accession_number, t.patient_id, t.study_version, t.draft_sr_id, t.draft_sr_uid,
                   t.model_name, t.model_version, t.weights_sha256,
                   t.received_at, t.drafted_at, CASE WHEN t.decision = 'approved' THEN t.decided_at END AS approved_at,
                   {_seconds(dialect, "t.received_at", "t.drafted_at")} AS draft_seconds,
                   CASE WHEN t.decision = 'approved' THEN {_seconds(dialect, "t.drafted_at", "t.decided_at")} END AS approval_seconds,
                   CASE WHEN t.decision = 'approved' THEN {_seconds(dialect, "t.received_at", "t.decided_at")} END AS total_seconds
            FROM v_drafts t
            WHERE NOT EXISTS (SELECT 1 FROM sr_documents b WHERE b.study_id = t.study_id AND b.kind = 'draft' AND b.id > t.draft_sr_id)""",
        "v_turnaround_by_model": _turnaround_by_model(dialect),
        "v_model_quality": _model_quality(dialect),
        "v_failed_work": """
            SELECT 'job' AS kind, j.id AS job_id, CAST(NULL AS BIGINT) AS dispatch_id, st.study_uid, st.accession_number,
                   sv.number AS study_version, CAST(NULL AS VARCHAR(64)) AS sr_uid, CAST(NULL AS VARCHAR(16)) AS sr_kind,
                   CAST(NULL AS VARCHAR(300)) AS destination, j.attempts, j.error, j.finished_at AS failed_at
            FROM jobs j
            JOIN study_versions sv ON sv.id = j.study_version_id
            JOIN studies st ON st.id = sv.study_id
            WHERE j.status = 'failed'
            UNION ALL
            SELECT 'dispatch', sr.job_id, d.id, st.study_uid, st.accession_number, sv.number, sr.sop_instance_uid, sr.kind,
                   d.destination, d.attempts, d.error,
                   COALESCE((SELECT MAX(a.finished_at) FROM dispatch_attempts a WHERE a.dispatch_id = d.id), d.created_at)
            FROM dispatches d
            JOIN sr_documents sr ON sr.id = d.sr_document_id
            JOIN study_versions sv ON sv.id = sr.study_version_id
            JOIN studies st ON st.id = sr.study_id
            WHERE d.status = 'failed'""",
    }


def upgrade() -> None:
    """Upgrade schema."""
    for name, select in views(op.get_bind().dialect.name).items():
        op.execute(f"CREATE VIEW {name} AS {select.strip()}")


def downgrade() -> None:
    """Downgrade schema."""
    for name in reversed(list(views(op.get_bind().dialect.name))):
        op.execute(f"DROP VIEW IF EXISTS {name}")
