"""Latency of the admins' audit queries on PostgreSQL with a million audit events.

Creates a scratch database, migrates it to the revision before 0008 (``down_revision`` of that
migration), fills it with a year of synthetic but realistically mixed history (studies, versions, jobs, draft and verified SRs, reviews, dispatches, and
``--events`` audit events from DICOM peers, the assembler, workers, radiologists and admins,
each study's events around its arrival time) using set-based ``INSERT ... SELECT`` from
``generate_series``, upgrades it to head (0008 backfills ``draft_outcomes`` from that history, as
it does in a database upgraded in place), then times every query the admins are documented to run: the functions of
``service/audit_queries.py`` (what ``medcap audit``, the admin pages and ``/api/admin`` call) and
every SQL example of ``docs/audit.md`` (``sql`` and ``sql postgresql`` blocks, their literal
study, accession, patient and user replaced by ones present in the data; run after
``SET jit = off`` as that document advises, and the per-model views once more without it). Reports p50 and p95
over ``--repeat`` runs after two warm-up runs, prints a table and writes
``benchmarks/results/audit-queries-<UTC time>.json``. The scratch database is dropped at the end
(unless ``--keep``).

    .venv/bin/python benchmarks/audit_queries.py [--events 1000000] [--studies 40000] [--repeat 30]
        [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432] [--explain] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import migrations  # noqa: E402
from service import audit_queries as aq  # noqa: E402
from service.database import Database  # noqa: E402

START = datetime(2026, 1, 1, tzinfo=UTC)
SPAN_SECONDS = 365 * 86400
THRESHOLD_MS = 200.0

# (first, last) per mille of the events, action, who, object type, whether it names a study
KINDS = [
    (0, 79, "association.accepted", "dicom", "association", False),
    (80, 159, "association.ended", "dicom", "association", False),
    (160, 239, "study.receiving", "dicom", "study", True),
    (240, 269, "instance.replaced", "dicom", "instance", True),
    (270, 319, "study.version_created", "assembler", "study_version", True),
    (320, 369, "job.created", "assembler", "job", True),
    (370, 419, "job.enqueued", "assembler", "job", True),
    (420, 469, "job.started", "worker", "job", True),
    (470, 517, "job.succeeded", "worker", "job", True),
    (518, 519, "job.failed", "worker", "job", True),
    (520, 569, "sr.written", "worker", "sr_document", True),
    (570, 619, "dispatch.queued", "worker", "dispatch", True),
    (620, 669, "dispatch.enqueued", "assembler", "dispatch", True),
    (670, 718, "dispatch.delivered", "worker", "dispatch", True),
    (719, 719, "dispatch.failed", "worker", "dispatch", True),
    (720, 799, "worklist.viewed", "user", "worklist", False),
    (800, 899, "study.viewed", "user", "sr_document", True),
    (900, 939, "draft.approved", "user", "sr_document", True),
    (940, 944, "draft.rejected", "user", "sr_document", True),
    (945, 969, "auth.login", "user", "user", False),
    (970, 974, "auth.login_failed", "web", "user", False),
    (975, 984, "auth.logout", "user", "user", False),
    (985, 989, "auth.access_denied", "user", "route", False),
    (990, 991, "audit.searched", "admin", "audit", False),
    (992, 992, "audit.exported", "admin", "audit", False),
    (993, 995, "job.retry_scheduled", "worker", "job", True),
    (996, 997, "dispatch.retry_scheduled", "worker", "dispatch", True),
    (998, 998, "user.password_reset", "admin", "user", False),
    (999, 999, "job.retry_requested", "cli", "job", True),
]


def generate(conn: Any, studies: int, events: int) -> None:
    p = {"start": START, "span": SPAN_SECONDS, "studies": studies, "events": events}
    run = lambda sql: conn.execute(text(sql), p)  # noqa: E731
    run("""INSERT INTO users (username, display_name, role, password_hash, disabled, created_at, password_changed_at)
           SELECT 'r' || lpad(g::text, 2, '0'), 'Reader^R' || g, 'radiologist', 'x', false, :start, :start FROM generate_series(1, 20) g
           UNION ALL SELECT 'admin' || g, 'Admin^A' || g, 'admin', 'x', false, :start, :start FROM generate_series(1, 2) g""")
    run("""INSERT INTO studies (study_uid, patient_id, patient_name, accession_number, study_date, study_description, first_received_at)
           SELECT '1.2.826.0.1.3680043.10.' || g, 'P' || lpad((g / 2)::text, 7, '0'),
                  (ARRAY['SMITH','JONES','BROWN','MILLER','DAVIS','GARCIA','WILSON','TAYLOR','THOMAS','MOORE','MARTIN','LEE','WHITE',
                         'HARRIS','CLARK','LEWIS','YOUNG','KING','WRIGHT','SCOTT'])[1 + g % 20] || '^' ||
                  (ARRAY['ANNA','JOHN','MARIA','PETER','LINDA','JAMES','SARA','PAUL','EMMA','MARK','JULIA','DAVID','LAURA','TOM','NINA'])[1 + (g / 20) % 15]
                  || '^' || chr(65 + (g / 300) % 26),
                  'A' || lpad(g::text, 8, '0'), '20260101', 'CT HEAD',
                  :start + make_interval(secs => g::double precision * :span / :studies)
           FROM generate_series(1, :studies) g""")
    # Every study a version 1; one in 33 a version 2 (late images) a quarter of an hour later.
    run("""INSERT INTO study_versions (study_id, number, created_at, trigger, instance_count, captionable_count)
           SELECT id, 1, first_received_at + interval '30 seconds', 'stable', 200, 200 FROM studies
           UNION ALL SELECT id, 2, first_received_at + interval '15 minutes', 'stable', 210, 210 FROM studies WHERE id % 33 = 0""")
    run("""INSERT INTO jobs (study_version_id, status, created_at, enqueued_at, started_at, finished_at, attempts, error, inferred_at,
                             sr_written_at, worker)
           SELECT id, CASE WHEN study_id % 50 = 7 THEN 'failed' ELSE 'succeeded' END, created_at, created_at + interval '1 second',
                  created_at + interval '2 seconds', created_at + make_interval(secs => 20 + (id * 7919) % 300),
                  CASE WHEN study_id % 50 = 7 THEN 3 ELSE 1 END, CASE WHEN study_id % 50 = 7 THEN 'RuntimeError: CUDA out of memory' END,
                  created_at + make_interval(secs => 15 + (id * 7919) % 300), created_at + make_interval(secs => 19 + (id * 7919) % 300),
                  'worker:gpu' || (1 + id % 4)
           FROM study_versions""")
    run("""INSERT INTO sr_documents (kind, idempotency_key, study_id, study_version_id, job_id, sop_instance_uid, series_uid, completion_flag,
                                     verification_flag, path, sha256, created_at, created_by)
           SELECT 'draft', 'draft:' || sv.id, sv.study_id, sv.id, j.id, '2.25.11.' || j.id, '2.25.12.' || j.id, 'PARTIAL', 'UNVERIFIED',
                  '/data/reports/' || j.id || '.dcm', md5(j.id::text) || md5(j.id::text), j.finished_at, j.worker
           FROM jobs j JOIN study_versions sv ON sv.id = j.study_version_id WHERE j.status = 'succeeded'""")
    # Three model versions; every fourth SR covers two series.
    run("""INSERT INTO drafts (sr_document_id, job_id, series_uid, modality, text, key_images, model_name, model_type, model_version,
                               weights_sha256, generation_preset, created_at)
           SELECT sr.id, sr.job_id, sr.series_uid || '.' || s.n, 'CT', 'No acute intracranial abnormality.', '[]', 'msmedcap', 'msmedcap',
                  CASE WHEN sr.study_id % 10 < 6 THEN '1.0' WHEN sr.study_id % 10 < 9 THEN '1.1' ELSE '2.0' END,
                  repeat(CASE WHEN sr.study_id % 10 < 6 THEN 'a' WHEN sr.study_id % 10 < 9 THEN 'b' ELSE 'c' END, 64), 'fast', sr.created_at
           FROM sr_documents sr CROSS JOIN generate_series(1, 2) s(n) WHERE s.n = 1 OR sr.id % 4 = 0""")
    # Nine in ten drafts of the latest version decided: 80 % approved (40 % of those edited), 20 % rejected.
    run("""INSERT INTO reviews (draft_sr_id, decision, reason, reviewer_id, decided_at, findings, impression, edited, edit_distance,
                                draft_characters)
           SELECT sr.id, CASE WHEN (sr.id * 37) % 10 < 8 THEN 'approved' ELSE 'rejected' END,
                  CASE WHEN (sr.id * 37) % 10 >= 8 THEN 'hallucinated finding' END, u.id,
                  sr.created_at + make_interval(secs => 600 + (sr.id * 7919) % 86400), '[]', 'Normal.',
                  (sr.id * 37) % 10 < 8 AND (sr.id * 13) % 10 < 4,
                  CASE WHEN (sr.id * 37) % 10 < 8 AND (sr.id * 13) % 10 < 4 THEN 1 + (sr.id * 31) % 120 ELSE 0 END,
                  250 + sr.id % 200
           FROM sr_documents sr
           JOIN study_versions sv ON sv.id = sr.study_version_id
           JOIN users u ON u.username = 'r' || lpad((1 + sr.id % 20)::text, 2, '0')
           WHERE sr.id % 10 <> 0 AND NOT (sv.number = 1 AND sv.study_id % 33 = 0)""")
    run("""INSERT INTO sr_documents (kind, idempotency_key, study_id, study_version_id, predecessor_id, sop_instance_uid, series_uid,
                                     completion_flag, verification_flag, path, sha256, created_at, created_by)
           SELECT 'verified', 'verified:' || d.id, d.study_id, d.study_version_id, d.id, '2.25.13.' || d.id, '2.25.14.' || d.id, 'COMPLETE',
                  'VERIFIED', '/data/reports/v' || d.id || '.dcm', md5(d.id::text) || md5(d.id::text), r.decided_at, 'user:r01'
           FROM reviews r JOIN sr_documents d ON d.id = r.draft_sr_id WHERE r.decision = 'approved'""")
    run(
        """UPDATE reviews SET verified_sr_id = v.id FROM sr_documents v WHERE v.kind = 'verified' AND v.predecessor_id = reviews.draft_sr_id"""
    )
    run("""INSERT INTO outputs (report_id, kind, media_type, path, sha256, created_at)
           SELECT id, 'dicom-sr', 'application/dicom', path, sha256, created_at FROM sr_documents""")
    run("""INSERT INTO dispatches (output_id, destination, status, attempts, created_at, delivered_at, error)
           SELECT id, 'PACS@10.0.0.9:104', CASE WHEN id % 100 = 3 THEN 'failed' ELSE 'delivered' END, CASE WHEN id % 100 = 3 THEN 5 ELSE 1 END,
                  created_at, CASE WHEN id % 100 = 3 THEN NULL ELSE created_at + interval '2 seconds' END,
                  CASE WHEN id % 100 = 3 THEN 'gave up after 5 attempts: association refused' END
           FROM outputs""")
    run("""INSERT INTO dispatch_attempts (dispatch_id, number, started_at, finished_at, outcome, error, instances, worker)
           SELECT id, 5, created_at + interval '1 hour', created_at + interval '1 hour 5 seconds', 'transient', error, '[]', 'worker:gpu1'
           FROM dispatches WHERE status = 'failed'""")
    kinds = ", ".join(f"({lo}, {hi}, '{action}', '{who}', '{obj}', {str(study).lower()})" for lo, hi, action, who, obj, study in KINDS)
    run(f"""WITH kinds(lo, hi, action, who, object_type, has_study) AS (VALUES {kinds}),
            g AS (SELECT g, (g * 7919) % 1000 AS b,
                         LEAST(:studies, GREATEST(1, (g::bigint * :studies / :events) + (g * 13) % 7 - 3)) AS st
                  FROM generate_series(1::bigint, :events) g)
            INSERT INTO audit_events (at, actor, action, object_type, object_id, study_uid, details)
            SELECT :start + make_interval(secs => g.g::double precision * :span / :events),
                   CASE k.who WHEN 'dicom' THEN 'dicom:CT' || (1 + g.g % 6) || '@10.0.1.' || (10 + g.g % 6)
                              WHEN 'assembler' THEN 'system:assembler'
                              WHEN 'worker' THEN 'worker:gpu' || (1 + g.g % 4)
                              WHEN 'user' THEN 'user:r' || lpad((1 + ((hashint4(g.g::int)::bigint % 20) + 20) % 20)::text, 2, '0')
                              WHEN 'admin' THEN 'user:admin' || (1 + g.g % 2)
                              WHEN 'web' THEN 'web:10.0.3.' || (g.g % 250)
                              ELSE 'cli:ops' END,
                   k.action, k.object_type,
                   CASE WHEN k.has_study THEN '1.2.826.0.1.3680043.10.' || g.st || '.' || (g.g % 5) ELSE g.g::text END,
                   CASE WHEN k.has_study THEN '1.2.826.0.1.3680043.10.' || g.st END,
                   (CASE WHEN k.who IN ('user', 'admin', 'web') THEN '{{"address": "10.0.2.' || (g.g % 200) || '"}}'
                         WHEN k.action LIKE '%failed' THEN '{{"error": "association refused"}}'
                         WHEN k.action = 'draft.approved' THEN '{{"edited": true, "edit_distance": ' || (g.g % 90) || '}}'
                         ELSE '{{}}' END)::json
            FROM g JOIN kinds k ON g.b BETWEEN k.lo AND k.hi""")


def aggregates_migration() -> Any:
    """Migration 0008 (draft_outcomes), whose ``down_revision`` is the schema the history is generated in."""
    script = ScriptDirectory.from_config(migrations.alembic_config(None)).get_revision("0008")
    assert script is not None
    return script.module


def nearest_rank(samples: list[float], percent: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)]


class Capture:
    """The SQL statements a function sent (for --explain)."""

    def __init__(self, engine: Any) -> None:
        self.statements: list[tuple[str, Any]] = []
        self.on = False
        event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if self.on and statement.lstrip().upper().startswith(("SELECT", "WITH")):
            self.statements.append((statement, parameters))


def docs_queries(substitutions: dict[str, str]) -> list[tuple[str, str]]:
    """(name, sql) of each ``sql`` and ``sql postgresql`` block of docs/audit.md, literals swapped for ones in the data."""
    doc = (REPO / "docs" / "audit.md").read_text()
    found = []
    heading = ""
    for part in re.split(r"(^## [^\n]*$|^```sql[^\n]*\n.*?^```$)", doc, flags=re.M | re.S):
        if part.startswith("## "):
            heading = part[3:].split(":")[0].strip("` ")
        elif part.startswith("```sql"):
            info, body = part.split("\n", 1)
            if "sqlite" in info:
                continue
            sql = body.rsplit("```", 1)[0].strip().rstrip(";")
            for old, new in substitutions.items():
                sql = sql.replace(old, new)
            first = " ".join(sql.split())[:60]
            found.append((f"docs {heading}: {first}", sql))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432", help="server URL, without a database name")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--studies", type=int, default=40_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--explain", action="store_true", help=f"print EXPLAIN ANALYZE of queries with p95 over {THRESHOLD_MS:.0f} ms")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database (its name is printed)")
    parser.add_argument("--only", help="time only queries whose name contains this")
    parser.add_argument("--reuse", metavar="DATABASE", help="time against a database kept by an earlier --keep run (not dropped)")
    args = parser.parse_args()

    admin = create_engine(f"{args.pg_url}/postgres", isolation_level="AUTOCOMMIT")
    name = args.reuse or f"medcap_bench_audit_{uuid.uuid4().hex[:8]}"
    if not args.reuse:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    print(f"scratch database {name}", flush=True)
    db = Database(f"{args.pg_url}/{name}")
    try:
        began = time.perf_counter()
        if not args.reuse:
            # The history is written in the tables' shape before migration 0008, which then backfills
            # its draft outcomes from it, as it does for a database upgraded in place.
            db.upgrade(aggregates_migration().down_revision)
            with db.engine.begin() as conn:
                generate(conn, args.studies, args.events)
        generated = time.perf_counter() - began
        began = time.perf_counter()
        db.upgrade()
        migrated = time.perf_counter() - began
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
            counts = {
                t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()
                for t in ("audit_events", "studies", "sr_documents", "drafts", "reviews", "dispatches", "draft_outcomes")
            }
            size = conn.execute(text("SELECT pg_size_pretty(pg_database_size(current_database()))")).scalar_one()
            server = conn.execute(text("SHOW server_version")).scalar_one()
            sample = conn.execute(
                text("SELECT study_uid, accession_number, patient_id FROM studies WHERE id = :id"), {"id": args.studies // 2}
            ).one()
        print(f"generated in {generated:.1f} s, migrated in {migrated:.1f} s: {counts}, database {size}, PostgreSQL {server}", flush=True)
        results = run_queries(db, args, sample)
    finally:
        db.dispose()
        if not (args.keep or args.reuse):
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    width = max(len(r["name"]) for r in results)
    print(f"\n{'query':<{width}}  {'p50 ms':>8}  {'p95 ms':>8}  {'rows':>6}")
    for r in results:
        flag = "  SLOW" if r["p95_ms"] > THRESHOLD_MS else ""
        print(f"{r['name']:<{width}}  {r['p50_ms']:>8.1f}  {r['p95_ms']:>8.1f}  {r['rows']:>6}{flag}")
    out = REPO / "benchmarks" / "results" / f"audit-queries-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs")
    out.write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "load_average": load,
                "cpus": os.cpu_count(),
                "events": args.events,
                "studies": args.studies,
                "repeat": args.repeat,
                "counts": counts,
                "database_size": size,
                "postgresql": server,
                "generate_seconds": generated,
                "migrate_seconds": migrated,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"\nsaved {out.relative_to(REPO)}")
    return 0


def run_queries(db: Database, args: argparse.Namespace, sample: Any) -> list[dict[str, Any]]:
    study_uid, accession, patient_id = sample
    month = (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC))
    day = (datetime(2026, 6, 15, tzinfo=UTC), datetime(2026, 6, 16, tzinfo=UTC))
    now = START + timedelta(seconds=SPAN_SECONDS)

    def search(**kw: Any) -> Callable[[], int]:
        return lambda: len(aq.search_audit(db, aq.AuditSearch(**kw)).rows)

    def export(**kw: Any) -> Callable[[], int]:
        return lambda: aq.export_audit(db, aq.AuditSearch(limit=aq.MAX_ROWS, **kw)).rows

    functions: list[tuple[str, Callable[[], int]]] = [
        ("search: latest 100, no filter", search()),
        ("search: study UID", search(study_uid=study_uid)),
        ("search: accession", search(accession=accession)),
        ("search: patient ID", search(patient=patient_id)),
        ("search: patient name words", search(patient="smith anna k")),
        ("search: user", search(user="r07")),
        ("search: action (4 %)", search(action="draft.approved")),
        ("search: action (0.1 %)", search(action="audit.exported")),
        ("search: action family job.", search(action="job.")),
        ("search: user + action", search(user="r07", action="draft.rejected")),
        ("search: one day", search(since=day[0], until=day[1])),
        ("search: action + month", search(action="auth.login_failed", since=month[0], until=month[1])),
        ("search: user + month, page 5", search(user="r07", since=month[0], until=month[1], offset=400)),
        ("search: action, page 50", search(action="study.viewed", offset=4900)),
        ("export: user + month, CSV", export(user="r07", since=month[0], until=month[1])),
        ("export: action + month, CSV", export(action="draft.approved", since=month[0], until=month[1])),
        ("turnaround: studies, page 1", lambda: len(aq.study_turnaround(db))),
        ("turnaround: by model, all time", lambda: len(aq.turnaround_by_model(db))),
        ("turnaround: by model, one month", lambda: len(aq.turnaround_by_model(db, since=month[0], until=month[1]))),
        ("quality: by model, all time", lambda: len(aq.model_quality(db))),
        ("quality: by model, one month", lambda: len(aq.model_quality(db, since=month[0], until=month[1]))),
        ("failed work", lambda: len(aq.failed_work(db))),
        ("overview counts", lambda: int(bool(aq.overview(db, now)))),
    ]
    substitutions = {
        "1.2.826.0.1.3680043.8.498.1001": study_uid,
        "'A1001'": f"'{accession}'",
        "'PAT001'": f"'{patient_id}'",
        "%doe%jane%": "%smith%anna%",
        "user:smith": "user:r07",
    }

    def sql_runner(sql: str, *, jit: bool = False) -> Callable[[], int]:
        def run() -> int:
            with db.engine.connect() as conn:
                if not jit:  # as docs/audit.md advises
                    conn.execute(text("SET jit = off"))
                return len(conn.execute(text(sql)).all())

        return run

    documented = docs_queries(substitutions)
    functions += [(label, sql_runner(sql)) for label, sql in documented]
    # What that advice is worth: the same view with the server's defaults (JIT on).
    functions += [
        (f"{label} [JIT on]", sql_runner(sql, jit=True))
        for label, sql in documented
        if "FROM v_turnaround_by_model" in sql or "FROM v_model_quality" in sql
    ]
    capture = Capture(db.engine)
    results = []
    for label, fn in functions:
        if args.only and args.only not in label:
            continue
        capture.statements.clear()
        capture.on = True
        rows = fn()
        capture.on = False
        fn()
        samples = []
        for _ in range(args.repeat):
            began = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - began) * 1000)
        result = {"name": label, "p50_ms": statistics.median(samples), "p95_ms": nearest_rank(samples, 95), "rows": rows}
        results.append(result)
        print(f"{label}: p50 {result['p50_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms, {rows} rows", flush=True)
        if args.explain and result["p95_ms"] > THRESHOLD_MS:
            with db.engine.connect() as conn:
                for statement, parameters in capture.statements:
                    plan = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {statement}", parameters).scalars().all()
                    print("\n".join(["    " + line for line in plan]), flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
