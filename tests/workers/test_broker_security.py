"""The production broker: Redis with a password over TLS (rediss://), and workers that take JSON only.

A real redis-server is started on a loopback port with TLS only (no plain port), a password and a
certificate from a test CA; a real Celery worker (configured by ``workers.celery_app.configure``)
consumes from it.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from service.settings import SettingsError
from tests.conftest import free_port, wait_until
from tests.pki import issue, make_ca
from workers.celery_app import CAPTION_QUEUE, configure

PASSWORD = "broker secret 3f9a"


@dataclass(frozen=True)
class TlsRedis:
    port: int
    ca: Path

    def url(self, password: str = PASSWORD, db: int = 0) -> str:
        return f"rediss://:{password.replace(' ', '%20')}@127.0.0.1:{self.port}/{db}?ssl_cert_reqs=required&ssl_ca_certs={self.ca}"

    def client(self, password: str = PASSWORD) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=password, ssl=True, ssl_ca_certs=str(self.ca), ssl_cert_reqs="required"
        )


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is needed (apt-get install redis-server)")
    ca = make_ca(tmp_path, "ca")
    cert, key = issue(
        tmp_path,
        "redis",
        ca,
        "/CN=127.0.0.1",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n",
    )
    port = free_port()
    args = ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--requirepass", PASSWORD]
    args += ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca[0]), "--tls-auth-clients", "no"]
    args += ["--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    server = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    found = TlsRedis(port, ca[0])
    try:

        def answers() -> bool:
            try:
                return bool(found.client().ping())
            except redis.RedisError:
                assert server.poll() is None, server.stdout.read().decode() if server.stdout else "redis-server ended"
                return False

        wait_until(answers, "redis-server with TLS", timeout=20)
        yield found
    finally:
        server.terminate()
        server.wait(10)


def test_the_broker_needs_the_password_and_a_verified_certificate(tls_redis, tmp_path):
    with pytest.raises(redis.AuthenticationError):
        tls_redis.client(password="wrong password").ping()
    other_ca = make_ca(tmp_path, "other")
    stranger = redis.Redis(host="127.0.0.1", port=tls_redis.port, password=PASSWORD, ssl=True, ssl_ca_certs=str(other_ca[0]))
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        stranger.ping()
    with pytest.raises(redis.ConnectionError):  # no plain-text port at all
        redis.Redis(host="127.0.0.1", port=tls_redis.port, password=PASSWORD, socket_timeout=2).ping()


def test_a_rediss_url_must_verify_the_broker(make_settings, tls_redis):
    assert make_settings(broker_url=tls_redis.url()).broker_url == tls_redis.url()
    with pytest.raises(SettingsError, match="ssl_cert_reqs=required"):
        make_settings(broker_url=f"rediss://:x@127.0.0.1:{tls_redis.port}/0")
    with pytest.raises(SettingsError, match="ssl_cert_reqs=required"):
        make_settings(broker_url=f"rediss://:x@127.0.0.1:{tls_redis.port}/0?ssl_cert_reqs=none&ssl_ca_certs={tls_redis.ca}")


def test_a_worker_over_rediss_runs_json_tasks_and_refuses_pickled_ones(make_settings, tls_redis, caplog):
    settings = make_settings(broker_url=tls_redis.url())
    probe_app = Celery("medcap-probe")
    configure(settings, probe_app)
    ran: list[str] = []
    task_name = f"medcap.test_probe_{uuid.uuid4().hex}"  # Celery keeps task names process-wide

    @probe_app.task(name=task_name)
    def probe(token: str) -> None:
        ran.append(token)

    caplog.set_level(logging.WARNING)
    with start_worker(probe_app, pool="solo", concurrency=1, perform_ping_check=False, loglevel="WARNING", shutdown_timeout=10):
        # What an attacker with broker access would send: a pickle runs code as it is loaded.
        probe_app.send_task(task_name, args=["pickled"], queue=CAPTION_QUEUE, serializer="pickle")
        probe_app.send_task(task_name, args=["json"], queue=CAPTION_QUEUE)
        wait_until(lambda: "json" in ran, "the JSON task to run", timeout=30)
        time.sleep(0.5)
    assert ran == ["json"], "the pickled message never ran"
    assert any("Refusing to deserialize untrusted content of type pickle" in r.getMessage() for r in caplog.records)
    assert tls_redis.client().llen(CAPTION_QUEUE) == 0, "the refused message is dropped, not redelivered forever"
