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

    p = sub.add_parser("worker", help="run a Celery worker")
    p.add_argument("--queues", default="caption", help="comma-separated queues to consume (default: caption)")
    p.add_argument("--concurrency", type=int, help="worker processes (default: MEDCAP_WORKER_CONCURRENCY)")
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


def start_listening(settings: Settings, db: Any) -> tuple[Any, Any]:
    from service.assembly import Assembler, AssemblyLoop
    from service.clock import SystemClock
    from service.listener import Listener
    from workers.celery_app import CeleryPublisher, configure

    clock = SystemClock()
    listener = Listener(settings, db, clock)
    listener.start()
    assembler = Assembler(
        db, clock, CeleryPublisher(configure(settings)), quiet_seconds=settings.quiet_seconds,
        max_wait_seconds=settings.max_wait_seconds, redeliver_seconds=settings.job_redeliver_seconds,
    )  # fmt: skip
    loop = AssemblyLoop(assembler, settings.assembly_interval_seconds)
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


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = open_database(settings, upgrade=True)
    stop = _stop_on_signals()
    listener, loop = start_listening(settings, db)
    worker_cmd = [sys.executable, "-m", "service.cli"] + (["--config", str(args.config)] if args.config else []) + ["worker"]
    worker: subprocess.Popen[bytes] | None = None
    try:
        while not stop.is_set():
            if worker is None or worker.poll() is not None:
                if worker is not None:
                    LOG.error("worker exited with status %s; restarting it", worker.returncode)
                worker = subprocess.Popen(worker_cmd)
            stop.wait(1.0)
    finally:
        LOG.info("stopping")
        listener.stop()
        loop.stop()
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from workers.celery_app import configure

    open_database(settings).dispose()  # fail fast on a missing or outdated schema
    app = configure(settings)
    concurrency = args.concurrency or settings.worker_concurrency
    app.worker_main(["worker", "--loglevel", settings.log_level, "--queues", args.queues, "--concurrency", str(concurrency),
                     "--pool", "prefork", "--without-gossip", "--without-mingle", "--hostname", f"medcap-{os.getpid()}@%h"])  # fmt: skip
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
    from service.assembly import Assembler, ForceResult
    from service.clock import SystemClock
    from workers.celery_app import CeleryPublisher, configure

    db = open_database(settings)
    assembler = Assembler(
        db, SystemClock(), CeleryPublisher(configure(settings)), quiet_seconds=settings.quiet_seconds,
        max_wait_seconds=settings.max_wait_seconds, redeliver_seconds=settings.job_redeliver_seconds,
    )  # fmt: skip
    result = assembler.request_force(args.study_uid, audit.cli_actor(getpass.getuser()))
    if result is ForceResult.UNKNOWN_STUDY:
        raise CommandError(f"no study {args.study_uid} has been received")
    if result is ForceResult.NOTHING_PENDING:
        print(f"study {args.study_uid}: every received instance is already in a processed version; nothing to force")
        return 0
    created = assembler.tick()
    print(f"study {args.study_uid}: version created, job(s) {', '.join(map(str, created))} queued")
    return 0


if __name__ == "__main__":
    sys.exit(main())
