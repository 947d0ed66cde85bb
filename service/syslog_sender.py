"""The ATNA copy of the audit trail: drains ``audit_outbox`` to the audit repository as syslog.

Audit events are written to the database first (the record); an outbox row written in the same
transaction says that a copy is owed. This sender, a thread of ``medcap listen`` / ``serve``,
takes due rows in small batches (a lease, so that two listeners on one database do not both
send a row), turns each event into a DICOM audit message (service/atna.py), and sends it as an
RFC 5424 syslog message: over TLS with octet-counting framing (RFC 5425, the IHE ATNA transport;
the repository's certificate verified, our client certificate if configured) or over UDP
(RFC 5426, one datagram per message). A sent row is deleted; a row that could not be sent keeps
its error and is tried again after ``MEDCAP_AUDIT_SYSLOG_RETRY_SECONDS``. Nothing of this runs in
an ingest, sign-in or review transaction: a repository that is down only makes the outbox grow.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import delete, func, select, update

from service import atna
from service.clock import Clock
from service.database import Database
from service.schema import AuditCopy, AuditEvent
from service.settings import Settings

log = logging.getLogger(__name__)

# RFC 5424 PRI: facility 10 (security/authorization), severity 5 (notice), as IHE ITI-20 asks.
PRI = 10 * 8 + 5
APP_NAME = "MedCap"
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"  # RFC 5424 6.4: an UTF-8 MSG starts with the byte order mark
LEASE = timedelta(seconds=60)  # a claimed row is someone else's to retry after this long
BATCH = 100
TIMEOUT_SECONDS = 10.0


def frame(xml: bytes, at: datetime, hostname: str, procid: int) -> bytes:
    """One RFC 5424 syslog message carrying ``xml``."""
    timestamp = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    host = "".join(ch for ch in hostname if 33 <= ord(ch) <= 126)[:255] or "-"
    return f"<{PRI}>1 {timestamp} {host} {APP_NAME} {procid} {MSGID} - ".encode("ascii") + BOM + xml


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 4.3 framing: MSG-LEN SP SYSLOG-MSG."""
    return f"{len(message)} ".encode("ascii") + message


@dataclass(frozen=True)
class Repository:
    """Where the copies go: MEDCAP_AUDIT_SYSLOG_URL and its TLS files."""

    scheme: str  # tls | udp
    host: str
    port: int
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Repository | None:
        if not settings.audit_syslog_url:
            return None
        url = urlsplit(settings.audit_syslog_url)
        if url.hostname is None or url.port is None:
            raise ValueError(f"audit_syslog_url {settings.audit_syslog_url!r}: name a host and a port")
        return cls(
            url.scheme,
            url.hostname,
            url.port,
            settings.audit_syslog_ca_file,
            settings.audit_syslog_cert_file,
            settings.audit_syslog_key_file,
        )


class Transport:
    """A connection to the repository, opened when needed and dropped on any error."""

    def __init__(self, repository: Repository, timeout: float = TIMEOUT_SECONDS) -> None:
        self.repository = repository
        self.timeout = timeout
        self._socket: socket.socket | None = None
        self._context: ssl.SSLContext | None = None
        if repository.scheme == "tls":
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(repository.ca_file))
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if repository.cert_file and repository.key_file:
                context.load_cert_chain(str(repository.cert_file), str(repository.key_file))
            self._context = context

    def send(self, messages: Sequence[bytes]) -> None:
        """Send every message, or raise OSError (the connection is then closed)."""
        try:
            if self.repository.scheme == "udp":
                address = (self.repository.host, self.repository.port)
                family = socket.getaddrinfo(*address, type=socket.SOCK_DGRAM)[0][0]
                with socket.socket(family, socket.SOCK_DGRAM) as udp:
                    for message in messages:
                        udp.sendto(message, address)
                return
            connection = self._connect()
            connection.sendall(b"".join(octet_counted(m) for m in messages))
        except OSError:
            self.close()
            raise

    def _connect(self) -> socket.socket:
        if self._socket is None:
            raw = socket.create_connection((self.repository.host, self.repository.port), timeout=self.timeout)
            try:
                assert self._context is not None
                self._socket = self._context.wrap_socket(raw, server_hostname=self.repository.host)
            except BaseException:
                raw.close()
                raise
        return self._socket

    def close(self) -> None:
        if self._socket is not None:
            try:
                self._socket.close()
            finally:
                self._socket = None


class SyslogSender:
    def __init__(self, db: Database, settings: Settings, clock: Clock, repository: Repository) -> None:
        self.db = db
        self.clock = clock
        self.transport = Transport(repository)
        self.retry = timedelta(seconds=settings.audit_syslog_retry_seconds)
        self.interval = min(1.0, settings.audit_syslog_retry_seconds)
        hostname = socket.gethostname()
        self.source = atna.Source(settings.audit_source_id or hostname, settings.dicom_ae_title, hostname)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def send_due(self) -> int:
        """One pass: claim due rows, send their messages, delete what was sent. Returns how many were sent."""
        now = self.clock.now()
        with self.db.session() as s:
            claimed = list(
                s.scalars(
                    select(AuditCopy.id)
                    .where(AuditCopy.next_attempt_at <= now)
                    .order_by(AuditCopy.id)
                    .limit(BATCH)
                    .with_for_update(skip_locked=True)
                )
            )
            if not claimed:
                return 0
            s.execute(update(AuditCopy).where(AuditCopy.id.in_(claimed)).values(next_attempt_at=now + LEASE))
        ready: list[tuple[int, bytes]] = []
        broken: dict[int, str] = {}
        with self.db.session() as s:
            for copy_id, event in s.execute(
                select(AuditCopy.id, AuditEvent).join(AuditEvent, AuditEvent.id == AuditCopy.event_id).where(AuditCopy.id.in_(claimed))
            ):
                try:
                    ready.append((copy_id, frame(atna.message(s, event, self.source), event.at, self.source.host, os.getpid())))
                except (atna.InvalidAuditMessage, KeyError, ValueError) as exc:
                    log.error("audit event %s has no valid DICOM audit message: %s", event.id, exc)
                    broken[copy_id] = f"message: {exc}"
        sent: list[int] = []
        if ready:
            try:
                self.transport.send([m for _, m in ready])
                sent = [copy_id for copy_id, _ in ready]
            except OSError as exc:
                log.warning("audit repository %s: %s; %d messages wait for a retry", self.transport.repository.host, exc, len(ready))
                broken.update({copy_id: f"send: {exc}" for copy_id, _ in ready})
        with self.db.session() as s:
            if sent:
                s.execute(delete(AuditCopy).where(AuditCopy.id.in_(sent)))
            for copy_id, error in broken.items():
                s.execute(
                    update(AuditCopy)
                    .where(AuditCopy.id == copy_id)
                    .values(attempts=AuditCopy.attempts + 1, next_attempt_at=self.clock.now() + self.retry, last_error=error[:500])
                )
        return len(sent)

    def pending(self) -> int:
        with self.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(AuditCopy)) or 0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def stop(self, drain_seconds: float = 5.0) -> None:
        """Stop the thread, after a last pass that sends what is due (the application stop event)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(drain_seconds + TIMEOUT_SECONDS)
        try:
            self.send_due()
        except Exception:  # the database is away: the rows wait for the next start
            log.exception("last audit copy pass failed")
        self.transport.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                while self.send_due() == BATCH and not self._stop.is_set():
                    pass
            except Exception:  # never let a database blip end the thread
                log.exception("audit copy pass failed")
            self._stop.wait(self.interval)


def start(db: Database, settings: Settings, clock: Clock) -> SyslogSender | None:
    """The sender for the configured repository, started; None when MEDCAP_AUDIT_SYSLOG_URL is not set."""
    repository = Repository.from_settings(settings)
    if repository is None:
        return None
    sender = SyslogSender(db, settings, clock, repository)
    sender.start()
    return sender
