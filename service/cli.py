"""``medcap``: the one command-line entry point."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from models import model_commands
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
    if args.parent_pid:
        die_with_parent(args.parent_pid)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.log_level != "DEBUG":
        # pynetdicom logs every C-STORE at INFO; alembic every plugin it loads.
        for noisy in ("pynetdicom", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(settings, args) or 0)
    except (CommandError, model_commands.ModelCommandError) as exc:
        print(f"medcap: {exc}", file=sys.stderr)
        return 1


class CommandError(Exception):
    pass


def die_with_parent(parent: int) -> None:
    """End this process when ``parent`` ends, however it ends (``kill -9`` included): Linux's
    parent-death signal. SIGKILL, as Celery gives its own pool processes: a child of a dead
    `serve` must not run on beside the restarted one. Elsewhere, only the check below."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # it ended before the signal was asked for
        raise SystemExit(f"medcap: the parent process {parent} is gone")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medcap", description="MedCap: AI report drafts for CT and MR, from DICOM in to DICOM SR out.")
    parser.add_argument("--config", type=Path, help="TOML settings file (environment variables MEDCAP_* take precedence)")
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # `serve`'s children: end when serve ends
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

    p = sub.add_parser("web", help="run the review web app (worklist, review, admin; JSON API under /api)")
    p.set_defaults(func=cmd_web)

    p = sub.add_parser("users", help="manage the web app's users (passwords are read from stdin, never from the command line)")
    usub = p.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    q = usub.add_parser("add", help="add a user; the password is read from stdin")
    q.add_argument("username")
    q.add_argument("--role", required=True, choices=["radiologist", "admin"])
    q.add_argument("--display-name", required=True, help="DICOM person name Family^Given: the verifying observer in signed reports")
    q.set_defaults(func=cmd_users_add)
    for action, helptext in (
        ("disable", "stop a user from signing in (their sessions end at once)"),
        ("enable", "let a disabled user sign in again"),
    ):
        q = usub.add_parser(action, help=helptext)
        q.add_argument("username")
        q.set_defaults(func=cmd_users_disable, disable=action == "disable")
    q = usub.add_parser("reset-password", help="set a new password, read from stdin")
    q.add_argument("username")
    q.set_defaults(func=cmd_users_reset_password)
    usub.add_parser("list", help="list users and their roles").set_defaults(func=cmd_users_list)

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
    p.add_argument(
        "--destination",
        action="append",
        default=[],
        help="AE@host:port or an output_destinations URL; repeatable; also resends a delivered copy",
    )
    p.set_defaults(func=cmd_resend)

    p = sub.add_parser("export-feedback", help="write the approved reports' key images and final texts as a training table (DIR/table.csv)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for table.csv and images/ (made if missing)")
    p.add_argument("--since", metavar="DATE", help="only reports approved on or after this day (YYYY-MM-DD, UTC)")
    p.set_defaults(func=cmd_export_feedback)

    p = sub.add_parser("audit", help="the audit trail and report statistics: search, turnaround, quality, failed work")
    asub = p.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    search = asub.add_parser("search", help="audit events, newest first (the search itself is audited)")
    search.add_argument("--study", help="Study Instance UID")
    search.add_argument("--accession", help="accession number")
    search.add_argument("--patient", help="patient ID, or words of the patient's name")
    search.add_argument("--user", help="actor: user:NAME, cli:NAME, worker:HOST, dicom:AE@ADDRESS ...; a bare NAME means user:NAME")
    search.add_argument("--action", help="an action (draft.approved), or a family ending in '.' (job.)")
    search.add_argument("--limit", type=int, default=100)
    search.add_argument("--offset", type=int, default=0)
    for q in (
        search,
        asub.add_parser("turnaround", help="received -> draft -> approved, median and 90th percentile per model version"),
        asub.add_parser("quality", help="drafts approved unchanged and edit distance, per model version"),
    ):
        q.add_argument("--since", help="YYYY-MM-DD or an ISO time (UTC unless it names a zone); inclusive")
        q.add_argument("--until", help="YYYY-MM-DD (through that day) or an ISO time; exclusive")
    asub.add_parser("failed", help="failed jobs and failed dispatches (see `medcap retry`, `medcap resend`)")
    for q in asub.choices.values():
        q.add_argument("--csv", action="store_true", help="CSV on stdout instead of a table")
        q.set_defaults(func=cmd_audit)

    add_rules_commands(sub)
    p = sub.add_parser("sample", help="write a synthetic sample patient (head CT and brain MR) to send for a first run")
    p.add_argument("directory", type=Path, help="where to write it (DIR/ct-head/*.dcm, DIR/mr-brain/*.dcm)")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("dicomweb-client", help="manage the programs allowed to send studies over DICOMweb (STOW-RS)")
    csub = p.add_subparsers(dest="dicomweb_command", required=True, metavar="ACTION")
    q = csub.add_parser("add", help="allow a client; prints its bearer token once (only its hash is kept)")
    q.add_argument("name", help="1-16 letters, digits, '.', '_' or '-' (recorded as the calling AE title of its requests)")
    q.add_argument("--from", dest="networks", required=True, help="comma-separated addresses or CIDRs it connects from, e.g. 10.1.2.3/32")
    q.set_defaults(func=cmd_dicomweb_client_add)
    q = csub.add_parser("remove", help="revoke a client's token")
    q.add_argument("name")
    q.set_defaults(func=cmd_dicomweb_client_remove)
    csub.add_parser("list", help="list the allowed clients and their networks").set_defaults(func=cmd_dicomweb_client_list)

    model_commands.register(sub)  # caption, model, train, evaluate, data
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
        db,
        SystemClock(),
        CeleryPublisher(configure(settings)),
        quiet_seconds=settings.quiet_seconds,
        max_wait_seconds=settings.max_wait_seconds,
        redeliver_seconds=settings.job_redeliver_seconds,
        dispatch_stale_seconds=settings.dispatch_stale_seconds,
    )


def start_metrics(settings: Settings, *, worker: bool = False, children: bool = False) -> dict[str, str]:
    """Prometheus metrics (service/prometheus.py) on the configured port, if any; returns the environment for worker children."""
    from service import prometheus

    port = settings.worker_metrics_port if worker else settings.metrics_port
    try:
        if worker:
            prometheus.start_worker(settings)
            return {}
        return prometheus.start_service(settings, children=children)
    except OSError as exc:
        raise CommandError(f"cannot serve metrics on port {port}: {exc}") from None


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
    require_rules(settings)  # a broken rule file stops the service at start-up, not at the first study
    db = open_database(settings)
    start_metrics(settings)
    stop = _stop_on_signals()
    listener, loop = start_listening(settings, db)
    stop.wait()
    LOG.info("stopping")
    listener.stop()
    loop.stop()
    return 0


def require_model(settings: Settings) -> None:
    if settings.model is None:
        raise CommandError(
            "no captioning model: set MEDCAP_MODEL to a checkpoint directory "
            "(`medcap model demo --out DIR` trains the small demo model on this machine)"
        )


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    require_model(settings)
    require_rules(settings)
    settings.storage.prepare()
    db = open_database(settings, upgrade=True)
    worker_env = {**os.environ, **start_metrics(settings, children=True)}  # the workers' metrics are served here
    stop = _stop_on_signals()
    listener, loop = start_listening(settings, db)
    medcap = [sys.executable, "-m", "service.cli", "--parent-pid", str(os.getpid())] + (
        ["--config", str(args.config)] if args.config else []
    )
    # Separate workers, so an SR is never sent late because the model is busy with the next study.
    commands = {
        "caption": medcap + ["worker", "--queues", "caption"],
        "dispatch": medcap + ["worker", "--queues", "dispatch", "--concurrency", "1"],
        "web": medcap + ["web"],
    }
    workers: dict[str, subprocess.Popen[bytes]] = {}
    started: dict[str, float] = {}
    announced = False  # the start-up ends with one line saying what listens where, once the web app answers
    delay = dict.fromkeys(commands, 1.0)  # restart backoff: a child that cannot start (port taken) must not spin
    due = dict.fromkeys(commands, 0.0)
    try:
        while not stop.is_set():
            now = time.monotonic()
            for name, command in commands.items():
                worker = workers.get(name)
                if worker is not None and worker.poll() is None:
                    if now - started[name] > 60:
                        delay[name] = 1.0  # it has run for a while: the next exit restarts at once
                    continue
                if worker is not None and due[name] == 0.0:  # its exit, just noticed
                    due[name] = now + delay[name]
                    LOG.error("%s exited with status %s; restarting it in %.0f s", name, worker.returncode, delay[name])
                    delay[name] = min(delay[name] * 2, 60.0)
                if now >= due[name]:
                    workers[name], started[name], due[name] = subprocess.Popen(command, env=worker_env), now, 0.0
            if not announced and _answers(settings.web_bind_address, settings.web_port):
                print(started_line(settings), flush=True)
                announced = True
            stop.wait(0.5)
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


def started_line(settings: Settings) -> str:
    scheme = "https" if settings.web_tls_cert_file else "http"
    return (
        f"MedCap is up: DICOM {settings.dicom_ae_title} on {settings.dicom_bind_address}:{settings.dicom_port}, "
        f"web {scheme}://{settings.web_bind_address}:{settings.web_port}/ (Ctrl-C stops)"
    )


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port), timeout=0.2):
            return True
    except OSError:
        return False


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
        require_rules(settings)
    open_database(settings).dispose()  # fail fast on a missing or outdated schema
    start_metrics(settings, worker=True)  # before the pool forks
    app = configure(settings)
    app.medcap_load_model = "caption" in queues  # loaded once per worker process
    concurrency = args.concurrency or settings.worker_concurrency
    pool = "prefork"
    if "caption" in queues and settings.caption_studies_in_flight > 1:
        # One process holds the model; its threads are the studies in flight, batched together
        # (workers/tasks.py caption_model). A crashed process's studies are taken over once stale.
        pool, concurrency = "threads", settings.caption_studies_in_flight
        app.medcap_threads_pool = True
    app.worker_main(
        [
            "worker",
            "--loglevel",
            settings.log_level,
            "--queues",
            ",".join(queues),
            "--concurrency",
            str(concurrency),
            "--pool",
            pool,
            "--without-gossip",
            "--without-mingle",
            "--hostname",
            f"medcap-{'-'.join(queues)}-{os.getpid()}@%h",
        ]
    )
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
        print(
            f"{r.study_uid:<64}  {(r.patient_id or '')[:16]:<16}  {(r.accession_number or '')[:16]:<16}  "
            f"{r.instances:>5}  {r.pending:>5}  {r.versions:>3}  {r.state}"
        )
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


def cmd_web(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from service.web.app import create_app

    app = create_app(settings, open_database(settings))
    tls = (
        {"ssl_certfile": str(settings.web_tls_cert_file), "ssl_keyfile": str(settings.web_tls_key_file)}
        if settings.web_tls_cert_file
        else {}
    )
    scheme = "https" if tls else "http"
    LOG.info("review app on %s://%s:%d/ (API schema at /api/openapi.json)", scheme, settings.web_bind_address, settings.web_port)
    uvicorn.run(
        app,
        host=settings.web_bind_address,
        port=settings.web_port,
        log_level=settings.log_level.lower(),
        access_log=False,
        proxy_headers=False,
        server_header=False,
        **tls,
    )
    return 0


def _read_password(confirm: bool = True) -> str:
    """From the terminal (asked twice), or the first line of piped stdin: never from argv, where `ps` would show it."""
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Again: ") != first:
            raise CommandError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\n")


def _users(settings: Settings) -> Any:
    from service.clock import SystemClock
    from service.users import Users

    return Users(open_database(settings), SystemClock())


def cmd_users_add(settings: Settings, args: argparse.Namespace) -> int:
    from service import audit
    from service.users import UserError

    try:
        account = _users(settings).add(args.username, args.display_name, args.role, _read_password(), audit.cli_actor(getpass.getuser()))
    except UserError as exc:
        raise CommandError(str(exc)) from None
    print(f"user {account.username} added as {account.role.value}")
    return 0


def cmd_users_disable(settings: Settings, args: argparse.Namespace) -> int:
    from service import audit
    from service.users import UserError

    try:
        _users(settings).set_disabled(args.username, args.disable, audit.cli_actor(getpass.getuser()))
    except UserError as exc:
        raise CommandError(str(exc)) from None
    print(f"user {args.username} {'disabled' if args.disable else 'enabled'}")
    return 0


def cmd_users_reset_password(settings: Settings, args: argparse.Namespace) -> int:
    from service import audit
    from service.users import UserError

    try:
        _users(settings).reset_password(args.username, _read_password(), audit.cli_actor(getpass.getuser()))
    except UserError as exc:
        raise CommandError(str(exc)) from None
    print(f"password of {args.username} changed")
    return 0


def cmd_users_list(settings: Settings, args: argparse.Namespace) -> int:
    users = _users(settings).list()
    if not users:
        print("no users yet: add the first admin with `medcap users add NAME --role admin --display-name Family^Given`")
    for account, disabled in users:
        print(f"{account.username:<24} {account.role.value:<12} {account.display_name}{'  (disabled)' if disabled else ''}")
    return 0


def _dicomweb_clients(settings: Settings) -> Any:
    from service.clock import SystemClock
    from service.dicomweb_clients import DicomwebClients

    return DicomwebClients(open_database(settings), SystemClock())


def cmd_dicomweb_client_add(settings: Settings, args: argparse.Namespace) -> int:
    from service import audit
    from service.dicomweb_clients import ClientError

    try:
        client, token = _dicomweb_clients(settings).add(args.name, args.networks, audit.cli_actor(getpass.getuser()))
    except ClientError as exc:
        raise CommandError(str(exc)) from None
    print(f"DICOMweb client {client.name} added, from {', '.join(map(str, client.networks))}", file=sys.stderr)
    print("its bearer token (shown once; send it as 'Authorization: Bearer TOKEN'):", file=sys.stderr)
    print(token)
    return 0


def cmd_dicomweb_client_remove(settings: Settings, args: argparse.Namespace) -> int:
    from service import audit
    from service.dicomweb_clients import ClientError

    try:
        _dicomweb_clients(settings).remove(args.name, audit.cli_actor(getpass.getuser()))
    except ClientError as exc:
        raise CommandError(str(exc)) from None
    print(f"DICOMweb client {args.name} removed: its token no longer works")
    return 0


def cmd_dicomweb_client_list(settings: Settings, args: argparse.Namespace) -> int:
    clients = _dicomweb_clients(settings).list()
    if not clients:
        print("no DICOMweb clients: add one with `medcap dicomweb-client add NAME --from CIDR`")
    for client, added in clients:
        print(f"{client.name:<16} from {','.join(map(str, client.networks)):<32} {added}")
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
    from service import audit, outputs
    from service.clock import SystemClock
    from service.reports import RequeueError, resend_report

    db = open_database(settings)
    destinations = args.destination or list(settings.dispatch_destinations)
    kinds = outputs.configured(settings)
    try:
        for d in args.destination:
            kinds.for_destination(d)  # validates the form: some output kind must take it
        queued = resend_report(
            db,
            SystemClock(),
            args.sr,
            destinations,
            audit.cli_actor(getpass.getuser()),
            force=bool(args.destination),
            kinds=kinds,
        )
    except (RequeueError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    make_assembler(settings, db).publish_dispatches()
    print(f"SR {args.sr}: queued for {', '.join(queued)}")
    return 0


def cmd_export_feedback(settings: Settings, args: argparse.Namespace) -> int:
    from datetime import UTC, date, datetime, time

    from service import audit
    from service.clock import SystemClock
    from service.feedback import export_feedback

    try:
        since = datetime.combine(date.fromisoformat(args.since), time.min, UTC) if args.since else None
    except ValueError:
        raise CommandError(f"--since {args.since!r}: give a day as YYYY-MM-DD") from None
    if args.out.exists() and not args.out.is_dir():
        raise CommandError(f"--out {args.out}: not a folder")
    result = export_feedback(
        open_database(settings), settings.storage, SystemClock(), args.out, actor=audit.cli_actor(getpass.getuser()), since=since
    )
    for why in result.skipped:
        print(f"skipped {why}", file=sys.stderr)
    print(f"{result.images} key image(s) from {result.reports} approved report(s) written to {result.table}")
    return 0


def cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    from service import audit
    from service import audit_queries as aq
    from service.audit import Action
    from service.clock import SystemClock

    db = open_database(settings)
    try:
        since = aq.parse_time(getattr(args, "since", None))
        until = aq.parse_time(getattr(args, "until", None), end=True)
        if args.audit_command == "search":
            search = aq.AuditSearch(
                study_uid=args.study,
                accession=args.accession,
                patient=args.patient,
                user=args.user,
                action=args.action,
                since=since,
                until=until,
                limit=args.limit,
                offset=args.offset,
            )
            page = aq.search_audit(db, search)
            with db.session() as s:
                audit.record(
                    s,
                    SystemClock().now(),
                    audit.cli_actor(getpass.getuser()),
                    Action.AUDIT_EXPORTED if args.csv else Action.AUDIT_SEARCHED,
                    "audit",
                    "events",
                    filters=search.filters(),
                    offset=search.offset,
                    shown=len(page.rows),
                    via="cli",
                )
            if args.csv:
                aq.write_audit_csv(page.rows, sys.stdout)
                return 0
            print(
                aq.text_table(
                    ["AT (UTC)", "ACTOR", "ACTION", "OBJECT", "ACCESSION", "PATIENT", "DETAILS"],
                    [
                        (
                            r.at.strftime("%Y-%m-%d %H:%M:%S"),
                            r.actor,
                            r.action,
                            f"{r.object_type} {r.object_id}",
                            r.accession_number,
                            r.patient_id,
                            json.dumps(r.details, sort_keys=True)[:80],
                        )
                        for r in page.rows
                    ],
                )
            )
            if page.more:
                print(f"(more: --offset {search.offset + search.limit})")
        elif args.audit_command == "turnaround":
            header = [
                "MODEL",
                "VERSION",
                "WEIGHTS",
                "STUDIES",
                "APPROVED",
                "DRAFT P50",
                "DRAFT P90",
                "APPROVAL P50",
                "APPROVAL P90",
                "TOTAL P50",
                "TOTAL P90",
            ]
            stats = aq.turnaround_by_model(db, since=since, until=until)
            if args.csv:
                print(aq.rows_csv(list(aq.TurnaroundStats.__dataclass_fields__), [tuple(t.as_dict().values()) for t in stats]), end="")
            else:
                print(
                    aq.text_table(
                        header,
                        [
                            (
                                t.model_name,
                                t.model_version,
                                t.weights_sha256[:12],
                                t.studies,
                                t.approved,
                                *map(
                                    aq.duration,
                                    (
                                        t.draft_median_seconds,
                                        t.draft_p90_seconds,
                                        t.approval_median_seconds,
                                        t.approval_p90_seconds,
                                        t.total_median_seconds,
                                        t.total_p90_seconds,
                                    ),
                                ),
                            )
                            for t in stats
                        ],
                    )
                )
        elif args.audit_command == "quality":
            header = [
                "MODEL",
                "VERSION",
                "WEIGHTS",
                "DRAFTS",
                "REVIEWED",
                "APPROVED",
                "UNCHANGED",
                "REJECTED",
                "UNCHANGED RATE",
                "MEAN EDIT",
                "MEDIAN EDIT",
                "NORMALISED EDIT",
            ]
            quality = aq.model_quality(db, since=since, until=until)
            if args.csv:
                print(aq.rows_csv(list(aq.ModelQuality.__dataclass_fields__), [tuple(m.as_dict().values()) for m in quality]), end="")
            else:
                pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
                num = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
                print(
                    aq.text_table(
                        header,
                        [
                            (
                                m.model_name,
                                m.model_version,
                                m.weights_sha256[:12],
                                m.drafts,
                                m.reviewed,
                                m.approved,
                                m.approved_unchanged,
                                m.rejected,
                                pct(m.approved_unchanged_rate),
                                num(m.mean_edit_distance),
                                m.median_edit_distance,
                                pct(m.normalised_edit_distance),
                            )
                            for m in quality
                        ],
                    )
                )
        else:
            failed = aq.failed_work(db, limit=1000)
            if args.csv:
                print(aq.rows_csv(list(aq.FailedWork.__dataclass_fields__), [tuple(f.as_dict().values()) for f in failed]), end="")
            elif not failed:
                print("no failed jobs or dispatches")
            else:
                print(
                    aq.text_table(
                        ["KIND", "JOB", "SR", "DESTINATION", "ACCESSION", "ATTEMPTS", "FAILED AT (UTC)", "ERROR"],
                        [
                            (
                                f.kind,
                                f.job_id,
                                f.sr_uid,
                                f.destination,
                                f.accession_number,
                                f.attempts,
                                f.failed_at.strftime("%Y-%m-%d %H:%M:%S") if f.failed_at else "",
                                (f.error or "")[:80],
                            )
                            for f in failed
                        ],
                    )
                )
                print("run a failed job again with `medcap retry JOB`, send an SR again with `medcap resend SR`")
    except aq.QueryError as exc:
        raise CommandError(str(exc)) from None
    return 0


# -- routing rules (service/routing.py) -------------------------------------------------------


def add_rules_commands(sub: Any) -> None:
    p = sub.add_parser("rules", help="routing rules: which series are captioned, by which model, and where their SR goes")
    rsub = p.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    q = rsub.add_parser("check", help="validate a rule file and print its rules in order")
    q.add_argument("file", type=Path)
    q.set_defaults(func=cmd_rules_check)
    q = rsub.add_parser("explain", help="which rule decides each series of a study under the current rules, and why the others do not")
    q.add_argument("study_uid")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_rules_explain)


def require_rules(settings: Settings) -> Any:
    from service import routing

    try:
        return routing.configured(settings)
    except routing.RoutingError as exc:
        raise CommandError(f"MEDCAP_ROUTING_RULES: {exc}") from None


def cmd_rules_check(settings: Settings, args: argparse.Namespace) -> int:
    from service import outputs, routing

    try:
        rules = routing.load(args.file, check_destination=outputs.configured(settings).for_destination)
    except routing.RoutingError as exc:
        raise CommandError(str(exc)) from None
    print(f"{args.file}: {len(rules.rules)} rule(s), valid")
    for line in routing.describe(rules):
        print(f"  {line}")
    print("  a series no rule matches is skipped")
    return 0


def cmd_rules_explain(settings: Settings, args: argparse.Namespace) -> int:
    from pydicom.errors import InvalidDicomError

    from service import routing

    rules = require_rules(settings)
    db = open_database(settings)
    try:
        with db.session() as s:
            explained = routing.explain_study(s, settings.storage, rules, args.study_uid)
    except routing.RoutingError as exc:  # a pattern that ran out of time
        raise CommandError(str(exc)) from None
    except (OSError, ValueError, InvalidDicomError) as exc:  # a stored header that is missing or unreadable
        raise CommandError(f"cannot read the study's headers: {exc}") from None
    if explained is None:
        raise CommandError(f"no study {args.study_uid} has been received")
    if args.json:
        print(json.dumps(explained.as_dict(), indent=2))
    else:
        print("\n".join(explained.lines()))
    return 0


def cmd_sample(settings: Settings, args: argparse.Namespace) -> int:
    from dicom_io.sample_study import write_sample

    try:
        written = write_sample(args.directory)
    except OSError as exc:
        raise CommandError(f"cannot write the sample to {args.directory}: {exc}") from None
    for name, files in written.items():
        print(f"{args.directory / name}: {len(files)} instances")
    folders = " ".join(f"{args.directory / name}/*.dcm" for name in written)
    print(f"send it: TCP_NODELAY=1 /usr/bin/storescu -aet MYPACS -aec {settings.dicom_ae_title} 127.0.0.1 {settings.dicom_port} {folders}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
