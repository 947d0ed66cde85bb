"""``medcap``: the one command-line entry point."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from models import cli as models_cli
from service.settings import Settings, SettingsError, load_settings

LOG = logging.getLogger("medcap")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"medcap: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.log_level != "DEBUG":
        # pynetdicom logs every C-STORE at INFO; alembic every plugin it loads.
        for noisy in ("pynetdicom", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(settings, args) or 0)
    except (CommandError, models_cli.ModelCommandError) as exc:
        print(f"medcap: {exc}", file=sys.stderr)
        return 1


class CommandError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medcap", description="MedCap: AI report drafts for CT and MR, from DICOM in to DICOM SR out.")
    parser.add_argument("--config", type=Path, help="TOML settings file (environment variables MEDCAP_* take precedence)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run listener, assembler and worker(s) on this machine (the embedded default)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("listen", help="run the DICOM listener and the study assembler")
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("worker", help="run a Celery worker (caption: the model, on a GPU if there is one; dispatch: sends SRs)")
    p.add_argument("--queues", default="caption,dispatch", help="comma-separated queues to consume: caption, dispatch (default: both)")
    p.add_argument("--concurrency", type=int, help="worker processes (default: MEDCAP_WORKER_CONCURRENCY)")
    p.add_argument("--device", help="where the model runs: cpu, cuda, cuda:N or auto (default: MEDCAP_DEVICE)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("db", help="audit database maintenance")
    dbsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    dbsub.add_parser("upgrade", help="apply migrations up to the latest").set_defaults(func=cmd_db_upgrade)
    dbsub.add_parser("current", help="print the applied and latest revisions").set_defaults(func=cmd_db_current)

    p = sub.add_parser("studies", help="list received studies and their state")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_studies)

    p = sub.add_parser("force", help="process a study now, without waiting for the quiet period")
    p.add_argument("study_uid")
    p.set_defaults(func=cmd_force)

    p = sub.add_parser("reports", help="list the SRs written and where each was sent")
    p.add_argument("--failed", action="store_true", help="only failed jobs and SRs that failed to reach a destination")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_reports)

    p = sub.add_parser("retry", help="run a failed caption job again")
    p.add_argument("job_id", type=int)
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("resend", help="send an SR to its destinations again (those not yet delivered, or --destination)")
    p.add_argument("sr", help="SOP Instance UID of the SR (see `medcap reports`)")
    p.add_argument("--destination", action="append", default=[], help="AE@host:port; repeatable; also resends a delivered copy")
    p.set_defaults(func=cmd_resend)

    models_cli.register(sub)  # caption, model, train, evaluate, data
    return parser


# -- helpers -----------------------------------------------------------------------------


def open_database(settings: Settings, *, upgrade: bool = False) -> Any:
    from service.database import Database

    db = Database(settings.effective_database_url)
    if upgrade:
        db.upgrade()
    elif not db.is_current():
        raise CommandError(f"the audit database at {_redact(db.url)} is not at the latest schema: run `medcap db upgrade`")
    return db


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def make_assembler(settings: Settings, db: Any) -> Any:
    from service.assembly import Assembler
    from service.clock import SystemClock
    from workers.celery_app import CeleryPublisher, configure

    return Assembler(
        db, SystemClock(), CeleryPublisher(configure(settings)), quiet_seconds=settings.quiet_seconds,
        max_wait_seconds=settings.max_wait_seconds, redeliver_seconds=settings.job_redeliver_seconds,
        dispatch_stale_seconds=settings.dispatch_stale_seconds,
    )  # fmt: skip


def start_listening(settings: Settings, db: Any) -> tuple[Any, Any]:
    from service.assembly import AssemblyLoop
    from service.clock import SystemClock
    from service.listener import Listener

    listener = Listener(settings, db, SystemClock())
    listener.start()
    loop = AssemblyLoop(make_assembler(settings, db), settings.assembly_interval_seconds)
    loop.start()
    return listener, loop


# -- commands ----------------------------------------------------------------------------


def cmd_listen(settings: Settings, args: argparse.Namespace) -> int:
    db = open_database(settings)
    stop = _stop_on_signals()
    listener, loop = start_listening(settings, db)
    stop.wait()
    LOG.info("stopping")
    listener.stop()
    loop.stop()
    return 0


def require_model(settings: Settings) -> None:
    if settings.model is None:
        raise CommandError("no captioning model: set MEDCAP_MODEL to a checkpoint directory "
                           "(`medcap model demo --out DIR` trains the small demo model on this machine)")  # fmt: skip


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    require_model(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = open_database(settings, upgrade=True)
    stop = _stop_on_signals()
    listener, loop = start_listening(settings, db)
    base = [sys.executable, "-m", "service.cli"] + (["--config", str(args.config)] if args.config else []) + ["worker"]
    # Separate workers, so an SR is never sent late because the model is busy with the next study.
    commands = {"caption": base + ["--queues", "caption"], "dispatch": base + ["--queues", "dispatch", "--concurrency", "1"]}
    workers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        while not stop.is_set():
            for name, command in commands.items():
                worker = workers.get(name)
                if worker is None or worker.poll() is not None:
                    if worker is not None:
                        LOG.error("%s worker exited with status %s; restarting it", name, worker.returncode)
                    workers[name] = subprocess.Popen(command)
            stop.wait(1.0)
    finally:
        LOG.info("stopping")
        listener.stop()
        loop.stop()
        for worker in workers.values():
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in workers.values():
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from workers.celery_app import QUEUES, configure

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = sorted(set(queues) - set(QUEUES))
    if unknown or not queues:
        raise CommandError(f"--queues: unknown queue(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(QUEUES)}")
    if args.device:
        settings = load_settings(args.config, device=args.device)
    if "caption" in queues:
        require_model(settings)
    open_database(settings).dispose()  # fail fast on a missing or outdated schema
    app = configure(settings)
    app.medcap_load_model = "caption" in queues  # type: ignore[attr-defined]  # loaded once per worker process
    concurrency = args.concurrency or settings.worker_concurrency
    app.worker_main(["worker", "--loglevel", settings.log_level, "--queues", ",".join(queues), "--concurrency", str(concurrency),
                     "--pool", "prefork", "--without-gossip", "--without-mingle",
                     "--hostname", f"medcap-{'-'.join(queues)}-{os.getpid()}@%h"])  # fmt: skip
    return 0


def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    import migrations

    db = open_database(settings, upgrade=True)
    print(f"audit database {_redact(db.url)} is at revision {migrations.current_revision(db.engine)}")
    return 0


def cmd_db_current(settings: Settings, args: argparse.Namespace) -> int:
    import migrations
    from service.database import Database

    db = Database(settings.effective_database_url)
    print(f"applied: {migrations.current_revision(db.engine) or 'none'}; latest: {migrations.head_revision()}")
    return 0 if db.is_current() else 1


def cmd_studies(settings: Settings, args: argparse.Namespace) -> int:
    from service.study_status import list_studies

    rows = list_studies(open_database(settings), limit=args.limit)
    if args.json:
        print(json.dumps([row.as_dict() for row in rows], indent=2, default=str))
        return 0
    if not rows:
        print("no studies received yet")
        return 0
    header = f"{'STUDY INSTANCE UID':<64}  {'PATIENT ID':<16}  {'ACCESSION':<16}  {'INST':>5}  {'PEND':>5}  {'VER':>3}  STATE"
    print(header)
    for r in rows:
        print(f"{r.study_uid:<64}  {(r.patient_id or '')[:16]:<16}  {(r.accession_number or '')[:16]:<16}  "
              f"{r.instances:>5}  {r.pending:>5}  {r.versions:>3}  {r.state}")  # fmt: skip
    return 0


def cmd_force(settings: Settings, args: argparse.Namespace) -> int:
    from service import audit
    from service.assembly import ForceResult

    db = open_database(settings)
    assembler = make_assembler(settings, db)
    result = assembler.request_force(args.study_uid, audit.cli_actor(getpass.getuser()))
    if result is ForceResult.UNKNOWN_STUDY:
        raise CommandError(f"no study {args.study_uid} has been received")
    if result is ForceResult.NOTHING_PENDING:
        print(f"study {args.study_uid}: every received instance is already in a processed version; nothing to force")
        return 0
    created = assembler.tick()
    print(f"study {args.study_uid}: version created, job(s) {', '.join(map(str, created))} queued")
    return 0


def cmd_reports(settings: Settings, args: argparse.Namespace) -> int:
    from service.reports import list_reports

    rows = list_reports(open_database(settings), failed_only=args.failed, limit=args.limit)
    if args.json:
        print(json.dumps([row.as_dict() for row in rows], indent=2, default=str))
        return 0
    if not rows:
        print("no failed jobs or dispatches" if args.failed else "no reports yet")
        return 0
    for r in rows:
        print(r.describe())
    return 0


def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    from service import audit
    from service.clock import SystemClock
    from service.reports import RequeueError, retry_job

    db = open_database(settings)
    try:
        retry_job(db, SystemClock(), args.job_id, audit.cli_actor(getpass.getuser()))
    except RequeueError as exc:
        raise CommandError(str(exc)) from None
    make_assembler(settings, db).publish_pending()
    print(f"job {args.job_id} queued again")
    return 0


def cmd_resend(settings: Settings, args: argparse.Namespace) -> int:
    from service import audit
    from service.clock import SystemClock
    from service.reports import RequeueError, resend_report

    db = open_database(settings)
    destinations = args.destination or [str(d) for d in settings.destination_list]
    try:
        for d in args.destination:
            settings.destination(d)  # validates the form
        queued = resend_report(db, SystemClock(), args.sr, destinations, audit.cli_actor(getpass.getuser()), force=bool(args.destination))
    except (RequeueError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    make_assembler(settings, db).publish_dispatches()
    print(f"SR {args.sr}: queued for {', '.join(queued)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
