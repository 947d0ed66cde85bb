"""A real rsyslogd (Debian's rsyslog and rsyslog-gnutls) for the ATNA tests: TLS (RFC 5425) with
client certificates required, and UDP, on loopback ports, writing what it receives to a file."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port
from tests.pki import issue, make_ca

SERVER_USAGE = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n"
CLIENT_USAGE = "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n"
SEPARATOR = "\x1e"  # between the fields of a received line (rsyslog's template below)


@dataclass
class Rsyslog:
    folder: Path
    tls_port: int
    udp_port: int
    ca: Path
    client_cert: Path
    client_key: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def received_file(self) -> Path:
        return self.folder / "received.log"

    def received(self) -> list[dict[str, str]]:
        """Each message received: its PRI, version, app name, MSGID and MSG (the BOM removed)."""
        if not self.received_file.exists():
            return []
        found = []
        for line in self.received_file.read_text(encoding="utf-8").split("\n"):  # not splitlines(): it splits at \x1e
            if not line:
                continue
            pri, version, app, msgid, msg = line.split(SEPARATOR, 4)
            found.append({"pri": pri, "version": version, "app": app, "msgid": msgid, "msg": msg.lstrip("\ufeff").strip()})
        return found

    def start(self) -> None:
        config = self.folder / "rsyslog.conf"
        config.write_text(
            f"""
global(workDirectory="{self.folder}" maxMessageSize="64k"
       DefaultNetstreamDriver="gtls"
       DefaultNetstreamDriverCAFile="{self.ca}"
       DefaultNetstreamDriverCertFile="{self.folder / "server.pem"}"
       DefaultNetstreamDriverKeyFile="{self.folder / "server.key"}")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="x509/certvalid")
input(type="imtcp" port="{self.tls_port}" address="127.0.0.1")
module(load="imudp")
input(type="imudp" port="{self.udp_port}" address="127.0.0.1")
template(name="fields" type="string" string="%pri%{SEPARATOR}%protocol-version%{SEPARATOR}%app-name%{SEPARATOR}%msgid%{SEPARATOR}%msg%\\n")
action(type="omfile" file="{self.received_file}" template="fields" flushOnTXEnd="on" asyncWriting="off")
"""
        )
        self.process = subprocess.Popen(
            ["rsyslogd", "-n", "-f", str(config), "-i", str(self.folder / "rsyslogd.pid")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rsyslogd ended: {self.process.stdout.read().decode() if self.process.stdout else ''}")
            try:
                socket.create_connection(("127.0.0.1", self.tls_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("rsyslogd did not open its TLS port")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)
        self.process = None

    def wait_for(self, count: int, timeout: float = 20) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.received()
            if len(found) >= count:
                return found
            time.sleep(0.1)
        raise AssertionError(f"rsyslogd received {len(self.received())} messages, not {count}")


def make_rsyslog(folder: Path) -> Rsyslog:
    if shutil.which("rsyslogd") is None or not list(Path("/usr/lib").glob("*/rsyslog/lmnsd_gtls.so")):
        raise RuntimeError("rsyslogd with TLS is needed: apt-get install rsyslog rsyslog-gnutls (scripts/ensure-system)")
    ca = make_ca(folder, "syslog-ca")
    issue(folder, "server", ca, "/CN=127.0.0.1", SERVER_USAGE)
    client_cert, client_key = issue(folder, "client", ca, "/CN=medcap", CLIENT_USAGE)
    return Rsyslog(folder, free_port(), free_port(), ca[0], client_cert, client_key)


def tls_client_works(server: Rsyslog) -> bool:
    context = ssl.create_default_context(cafile=str(server.ca))
    context.load_cert_chain(str(server.client_cert), str(server.client_key))
    with socket.create_connection(("127.0.0.1", server.tls_port), timeout=5) as raw, context.wrap_socket(raw, server_hostname="127.0.0.1"):
        return True
