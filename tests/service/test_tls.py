"""DICOM TLS (PS3.15 B.1): the listener speaks TLS and admits only clients with a certificate from our CA.

Certificates are made at test time with the ``openssl`` CLI (the ``cryptography`` package is
not a dependency): a throwaway CA, a server certificate for 127.0.0.1/localhost, a client
certificate from the same CA, and one from a CA the listener does not trust.
"""

from __future__ import annotations

import shutil
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import func, select

from service.database import Database
from service.schema import Association, Instance
from service.settings import SettingsError, load_settings
from tests.conftest import series_files, wait_until
from tests.pki import issue, make_ca

CT = "ct-head-ge"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from a CA the listener does not know
    stranger_key: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates (apt-get install openssl)")
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "ca")
    server = issue(
        folder,
        "server",
        ca,
        "/CN=127.0.0.1",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n",
    )
    client_usage = "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n"
    client = issue(folder, "client", ca, "/CN=PACS", client_usage)
    stranger = issue(folder, "stranger", make_ca(folder, "other-ca"), "/CN=PACS", client_usage)
    return Pki(ca[0], *server, *client, *stranger)


@pytest.fixture
def tls_listener(start_listener, make_settings, pki: Pki):
    settings = make_settings(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_ca_file=pki.ca)
    return start_listener(settings)


def client_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """What a PACS configures: trust our CA, verify our name, optionally present a certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def associate(port: int, tls: ssl.SSLContext | None, server_hostname: str = "localhost"):
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10  # a refused peer must not hang the test
    tls_args = (tls, server_hostname) if tls is not None else None
    return ae.associate("127.0.0.1", port, ae_title="MEDCAP", tls_args=tls_args)


def count(db: Database, model: type) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
def test_client_with_certificate_stores_over_tls(db, tls_listener, pki, server_hostname):
    ct = series_files(CT)[0]
    assoc = associate(tls_listener.port, client_context(pki, pki.client_cert, pki.client_key), server_hostname)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ct)
    finally:
        assoc.release()
    assert status.Status == 0x0000

    def released() -> bool:
        with db.session() as s:
            return s.scalars(select(Association.outcome)).one_or_none() == "released"

    wait_until(released, "the TLS association to be recorded as released")
    with db.session() as s:
        row = s.scalars(select(Association)).one()
        inst = s.scalars(select(Instance)).one()
    assert row.tls and row.calling_ae == "PACS" and row.instances_received == 1
    assert inst.association_id == row.id and Path(inst.path).is_file()


@pytest.mark.parametrize("who", ["no certificate", "certificate from another CA"])
def test_client_without_a_trusted_certificate_is_refused(db, tls_listener, pki, who):
    ctx = client_context(pki) if who == "no certificate" else client_context(pki, pki.stranger_cert, pki.stranger_key)
    assoc = associate(tls_listener.port, ctx)
    # With TLS 1.3 the client finishes its half of the handshake first, and learns of the
    # refusal only when it reads; either way no association is established.
    assert not assoc.is_established
    if assoc.is_established:  # pragma: no cover - only on failure, to not leave it open
        assoc.abort()
    assert count(db, Association) == 0 and count(db, Instance) == 0
    assert not any(p.is_file() for p in tls_listener.settings.storage.instances_dir.rglob("*"))


def test_plain_dicom_client_is_refused(db, tls_listener):
    assoc = associate(tls_listener.port, tls=None)
    assert not assoc.is_established
    assert count(db, Association) == 0 and count(db, Instance) == 0


def test_silent_connection_does_not_block_other_clients(db, start_listener, make_settings, pki):
    """A peer that connects and never starts the TLS handshake must not stall the listener."""
    listener = start_listener(
        make_settings(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_ca_file=pki.ca, dicom_timeout_seconds=1)
    )
    with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as silent:
        assoc = associate(listener.port, client_context(pki, pki.client_cert, pki.client_key))
        try:
            assert assoc.is_established
            assert assoc.send_c_store(series_files(CT)[0]).Status == 0x0000
        finally:
            assoc.release()
        # ...and the silent peer itself is dropped once the (here 1 s) timeout has passed.
        try:
            assert silent.recv(1) == b""
        except ConnectionResetError:
            pass


@pytest.mark.parametrize("given", ["tls_cert_file", "tls_key_file", "tls_ca_file"])
def test_tls_files_must_be_set_together(tmp_path, pki, given):
    files = {"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key, "tls_ca_file": pki.ca}
    with pytest.raises(SettingsError) as error:
        load_settings(data_dir=tmp_path, **{given: files[given]})
    message = str(error.value)
    assert "tls_cert_file, tls_key_file and tls_ca_file must be set together" in message


def test_all_three_tls_files_enable_tls(tmp_path, pki):
    settings = load_settings(data_dir=tmp_path, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_ca_file=pki.ca)
    assert settings.tls_enabled
