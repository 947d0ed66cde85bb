"""The ATNA copy against a real rsyslogd: TLS with client certificates (RFC 5425) and UDP, queued
in the event's transaction, retried while the repository is away, never in the way of the work."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from lxml import etree
from sqlalchemy import func, select

from service import atna, audit
from service.audit import Action
from service.database import Database
from service.schema import AuditCopy, AuditEvent
from service.syslog_sender import PRI, Repository, SyslogSender
from service.users import Users
from service.web.app import create_app
from tests.conftest import series_files, storescu
from tests.rsyslog import Rsyslog, make_rsyslog, tls_client_works
from tests.service.web.conftest import PASSWORD
from tests.service.web.test_auth import attempt, browser


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """The audit database as a process with MEDCAP_AUDIT_SYSLOG_URL set opens it: events queue their copy."""
    database = Database(database_url, audit_copy=True)
    yield database
    database.dispose()


@pytest.fixture
def rsyslog(tmp_path) -> Iterator[Rsyslog]:
    folder = tmp_path / "rsyslog"
    folder.mkdir()
    server = make_rsyslog(folder)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def syslog_settings(make_settings, rsyslog):
    return make_settings(
        audit_syslog_url=f"tls://127.0.0.1:{rsyslog.tls_port}",
        audit_syslog_ca_file=rsyslog.ca,
        audit_syslog_cert_file=rsyslog.client_cert,
        audit_syslog_key_file=rsyslog.client_key,
        audit_syslog_retry_seconds=5,
        audit_source_id="MEDCAP-TEST",
    )


@pytest.fixture
def users(db, clock) -> None:
    accounts = Users(db, clock)
    accounts.add("smith", "Smith^Jane", "radiologist", PASSWORD, "cli:test")
    accounts.add("root", "Admin^Ann", "admin", PASSWORD, "cli:test")


def sender_for(db, settings, clock) -> SyslogSender:
    repository = Repository.from_settings(settings)
    assert repository is not None
    return SyslogSender(db, settings, clock, repository)


def outbox(db) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(AuditCopy)) or 0)


def received_events(server, count):
    messages = server.wait_for(count)
    documents = []
    for m in messages:
        assert (m["pri"], m["version"], m["app"], m["msgid"]) == (str(PRI), "1", "MedCap", "IHE+RFC-3881")
        document = etree.fromstring(m["msg"].encode())
        atna.validate(document)
        documents.append(document)
    return documents


def codes(documents):
    found = []
    for d in documents:
        type_code = d.find("EventIdentification/EventTypeCode")
        found.append(
            (
                d.find("EventIdentification/EventID").get("csd-code"),
                type_code.get("csd-code") if type_code is not None else None,
                d.find("EventIdentification").get("EventOutcomeIndicator"),
            )
        )
    return found


def test_the_test_repository_wants_a_client_certificate(rsyslog):
    assert tls_client_works(rsyslog)


@pytest.mark.peers
def test_sign_ins_searches_and_received_studies_reach_rsyslog_over_tls(db, clock, syslog_settings, rsyslog, users, start_listener):
    listener = start_listener(syslog_settings)
    files = series_files("ct-head-ge")[:2]
    assert storescu(listener, files, calling="STORESCU").returncode == 0
    storescu(listener, files[:1], calling="STRANGER", called="NOTUS")  # refused: called AE is not ours
    app = create_app(syslog_settings, db, clock)
    with browser(app, "192.0.2.7") as c:
        assert attempt(c, "smith", "wrong wrong wrong").status_code == 401
        assert attempt(c, "root", PASSWORD).status_code == 303
        assert c.get("/admin/audit?user=smith").status_code == 200
        assert c.get("/admin/audit.csv").status_code == 200
    expected = outbox(db)
    assert expected == 6, "received, refused, failed sign-in, sign-in, search, export: one copy each"

    assert sender_for(db, syslog_settings, clock).send_due() == expected
    documents = received_events(rsyslog, expected)
    assert sorted(codes(documents)) == sorted(
        [
            ("110104", None, "0"),  # instances received
            ("110113", "110126", "4"),  # refused association
            ("110114", "110122", "4"),  # failed sign-in
            ("110114", "110122", "0"),  # sign-in
            ("110112", None, "0"),  # audit search
            ("110106", None, "0"),  # CSV export
        ]
    )
    assert {d.find("AuditSourceIdentification").get("AuditSourceID") for d in documents} == {"MEDCAP-TEST"}
    received = next(d for d in documents if codes([d])[0][0] == "110104")
    assert received.find(".//SOPClass").get("NumberOfInstances") == "2"
    assert outbox(db) == 0, "sent copies leave the outbox; the audit events stay"
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(AuditEvent)) >= expected


def test_while_the_repository_is_away_copies_wait_and_then_arrive(db, clock, syslog_settings, rsyslog, users):
    rsyslog.stop()
    app = create_app(syslog_settings, db, clock)
    started = time.monotonic()
    with browser(app, "192.0.2.8") as c:
        assert attempt(c, "smith", PASSWORD).status_code == 303  # signing in does not wait for the repository
    assert time.monotonic() - started < 5
    sender = sender_for(db, syslog_settings, clock)
    assert sender.send_due() == 0
    with db.session() as s:
        (copy,) = s.scalars(select(AuditCopy)).all()
        assert copy.attempts == 1 and copy.last_error.startswith("send:") and copy.next_attempt_at > clock.now()
    rsyslog.start()
    assert sender.send_due() == 0, "not before its retry time"
    clock.advance(6)
    assert sender.send_due() == 1
    assert codes(received_events(rsyslog, 1)) == [("110114", "110122", "0")]
    assert outbox(db) == 0


def test_an_untrusted_repository_gets_nothing(db, clock, make_settings, rsyslog, tmp_path):
    from tests.pki import make_ca

    other_ca, _ = make_ca(tmp_path, "not-the-syslog-ca")
    settings = make_settings(audit_syslog_url=f"tls://127.0.0.1:{rsyslog.tls_port}", audit_syslog_ca_file=other_ca)
    with db.session() as s:
        audit.record(s, clock.now(), "web:192.0.2.1", Action.LOGIN_FAILED, "user", "smith", address="192.0.2.1")
    assert sender_for(db, settings, clock).send_due() == 0
    with db.session() as s:
        (copy,) = s.scalars(select(AuditCopy)).all()
    assert "CERTIFICATE_VERIFY_FAILED" in copy.last_error
    time.sleep(0.5)
    assert rsyslog.received() == []


def test_udp_delivery(db, clock, make_settings, rsyslog):
    settings = make_settings(audit_syslog_url=f"udp://127.0.0.1:{rsyslog.udp_port}")
    with db.session() as s:
        audit.record(s, clock.now(), "cli:root", Action.LISTENER_STARTED, "listener", "test:1")
    assert sender_for(db, settings, clock).send_due() == 1
    assert codes(received_events(rsyslog, 1)) == [("110100", "110120", "0")]


def test_without_a_repository_nothing_is_queued(database_url, clock):
    plain = Database(database_url)
    with plain.session() as s:
        audit.record(s, clock.now(), "web:192.0.2.1", Action.LOGIN_FAILED, "user", "smith", address="192.0.2.1")
    assert outbox(plain) == 0
    plain.dispose()


def test_events_that_are_not_copied_queue_nothing(db, clock):
    with db.session() as s:
        audit.record(s, clock.now(), "system:assembler", Action.JOB_CREATED, "job", 1)
        audit.record(s, clock.now(), "dicom:CT@10.0.0.1", Action.ASSOCIATION_ENDED, "association", 1, received=0)
    assert outbox(db) == 0


@pytest.mark.processes
def test_medcap_listen_reports_its_start_and_stop(db, syslog_settings, rsyslog, tmp_path):
    from tests.processes import Process, settings_env

    env = settings_env(
        syslog_settings,
        MEDCAP_AUDIT_SYSLOG_URL=syslog_settings.audit_syslog_url,
        MEDCAP_AUDIT_SYSLOG_CA_FILE=str(rsyslog.ca),
        MEDCAP_AUDIT_SYSLOG_CERT_FILE=str(rsyslog.client_cert),
        MEDCAP_AUDIT_SYSLOG_KEY_FILE=str(rsyslog.client_key),
    )
    listen = Process(["listen"], env, tmp_path / "listen.log")
    try:
        started = received_events(rsyslog, 1)
        assert codes(started) == [("110100", "110120", "0")], listen.output()
    finally:
        listen.stop()
    assert listen.proc.returncode == 0, listen.output()
    assert codes(received_events(rsyslog, 2))[1] == ("110100", "110121", "0"), "the stop event is sent before the process ends"
    assert outbox(db) == 0
