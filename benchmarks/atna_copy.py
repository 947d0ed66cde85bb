"""What the ATNA copy costs: an audit event's transaction with and without its outbox row (SQLite),
and how fast the sender empties the outbox into a real rsyslogd over TLS (render, schema check, send).

    PYTHONPATH=. .venv/bin/python benchmarks/atna_copy.py [--events 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from service import audit
from service.audit import Action
from service.clock import SystemClock
from service.database import Database
from service.settings import load_settings
from service.syslog_sender import Repository, SyslogSender
from tests.rsyslog import make_rsyslog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=2000)
    n = parser.parse_args().events
    folder = Path(tempfile.mkdtemp(prefix="atna-bench-"))
    (folder / "rsyslog").mkdir()
    server = make_rsyslog(folder / "rsyslog")
    server.start()
    clock = SystemClock()
    try:
        for copy in (False, True):
            db = Database(f"sqlite:///{folder}/medcap-{copy}.sqlite", audit_copy=copy)
            db.upgrade()
            started = time.perf_counter()
            for i in range(n):
                with db.session() as s:
                    audit.record(s, clock.now(), "web:192.0.2.1", Action.LOGIN_FAILED, "user", f"u{i}", address="192.0.2.1")
            print(f"audit_copy={copy}: {n} events, {(time.perf_counter() - started) / n * 1000:.2f} ms per event transaction")
        settings = load_settings(
            data_dir=folder / "data",
            audit_syslog_url=f"tls://127.0.0.1:{server.tls_port}",
            audit_syslog_ca_file=server.ca,
            audit_syslog_cert_file=server.client_cert,
            audit_syslog_key_file=server.client_key,
        )
        repository = Repository.from_settings(settings)
        assert repository is not None
        sender = SyslogSender(db, settings, clock, repository)
        started, sent = time.perf_counter(), 0
        while batch := sender.send_due():
            sent += batch
        elapsed = time.perf_counter() - started
        received = len(server.wait_for(n, timeout=60))
        print(f"sent {sent} messages (render, schema check, TLS) in {elapsed:.2f} s: {sent / elapsed:.0f}/s; rsyslogd received {received}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
