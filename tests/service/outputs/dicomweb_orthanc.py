"""Orthanc with its DICOMweb plugin (Debian's orthanc-dicomweb) and one registered user: the archive
the STOW-RS tests store SRs into."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import free_port

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "medcap", "stow-secret"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


class DicomWebOrthanc:
    """Orthanc with its DICOMweb plugin and one registered user: the archive MedCap stores SRs into."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
        if binary is None:
            pytest.fail("Orthanc is not installed (apt-get install orthanc)")
        if not PLUGIN.is_file():
            pytest.fail(f"Orthanc's DICOMweb plugin {PLUGIN} is missing (apt-get install orthanc-dicomweb; scripts/ensure-system)")
        config = {
            "Name": "MEDCAP-TEST-DICOMWEB",
            "StorageDirectory": str(self.home / "db"),
            "IndexDirectory": str(self.home / "db"),
            "Plugins": [str(PLUGIN)],
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "DicomServerEnabled": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        (self.home / "orthanc.json").write_text(json.dumps(config))
        with (self.home / "orthanc.log").open("wb") as log:
            self.process = subprocess.Popen([binary, str(self.home / "orthanc.json")], cwd=self.home, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, f"Orthanc exited: {(self.home / 'orthanc.log').read_text()[-2000:]}"
            try:
                self.request("GET", "/system")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail(f"Orthanc did not answer: {(self.home / 'orthanc.log').read_text()[-2000:]}")
                time.sleep(0.1)
        plugins = self.request("GET", "/plugins")
        assert "dicom-web" in plugins, f"the DICOMweb plugin did not load: {plugins}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={"Authorization": BASIC})
        with urllib.request.urlopen(req, timeout=30) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def instance(self, sop_uid: str) -> pydicom.Dataset | None:
        """The instance as Orthanc stored it, or None."""
        found = self._lookup(sop_uid)
        if not found:
            return None
        req = urllib.request.Request(f"{self.url}/instances/{found}/file", headers={"Authorization": BASIC})
        with urllib.request.urlopen(req, timeout=30) as response:
            return pydicom.dcmread(io.BytesIO(response.read()))

    def _lookup(self, sop_uid: str) -> str | None:
        req = urllib.request.Request(f"{self.url}/tools/lookup", data=sop_uid.encode(), method="POST", headers={"Authorization": BASIC})
        with urllib.request.urlopen(req, timeout=30) as response:
            hits = json.loads(response.read())
        return next((h["ID"] for h in hits if h["Type"] == "Instance"), None)

    @property
    def destination(self) -> str:
        return f"stow-rs+{self.url}/dicom-web"
