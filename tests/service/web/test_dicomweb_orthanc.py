"""STOW-RS in from a real client: Orthanc's DICOMweb plugin (Debian ``orthanc-dicomweb``) sends a study to MedCap."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from service.dicomweb_clients import DicomwebClients
from service.schema import Association, AuditEvent, Instance, Job, StudyVersion
from tests.conftest import free_port, make_assembler, series_files
from tests.service.web.test_dicomweb import run_app
from tests.tiers import requires

pytestmark = [pytest.mark.orthanc, pytest.mark.peers]

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
CT = "ct-head-ge"


class OrthancWeb:
    """An Orthanc with the DICOMweb plugin, reached over its REST API."""

    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log = log

    def request(self, method: str, path: str, body: bytes | dict[str, Any] | None = None, timeout: float = 120) -> Any:
        headers = {}
        if isinstance(body, dict):
            body, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else "(no log)"


@pytest.fixture(scope="module")
def orthanc_dicomweb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancWeb]:
    requires("peers")
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if binary is None or not PLUGIN.is_file():
        pytest.fail("Orthanc and its DICOMweb plugin are needed: apt-get install orthanc orthanc-dicomweb (scripts/ensure-system)")
    home = tmp_path_factory.mktemp("orthanc-dicomweb")
    http_port = free_port()
    config = {
        "Name": "MEDCAP-TEST-DICOMWEB",
        "StorageDirectory": str(home / "db"),
        "IndexDirectory": str(home / "db"),
        "Plugins": [str(PLUGIN)],
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (home / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = home / "orthanc.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, str(home / "orthanc.json")], cwd=home, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ)
        )
    server = OrthancWeb(f"http://127.0.0.1:{http_port}", log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"Orthanc exited with status {process.returncode}:\n{server.log_tail()}")
            try:
                server.request("GET", "/system", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"Orthanc did not answer within 30 s:\n{server.log_tail()}")
                time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_orthanc_stows_a_study_which_is_assembled_and_gets_a_job(db, clock, make_settings, orthanc_dicomweb, publisher):
    files = series_files(CT)
    parents = {orthanc_dicomweb.request("POST", "/instances", path.read_bytes())["ParentStudy"] for path in files}
    (study_id,) = parents
    settings = make_settings()
    _, token = DicomwebClients(db, clock).add("ORTHANC", "127.0.0.1/32", "cli:test")
    running = run_app(settings, db, clock)
    url = next(running)
    try:
        orthanc_dicomweb.request(
            "PUT",
            "/dicom-web/servers/medcap",
            {"Url": f"{url}/dicomweb/", "HttpHeaders": {"Authorization": f"Bearer {token}"}},
        )
        try:
            orthanc_dicomweb.request("POST", "/dicom-web/servers/medcap/stow", {"Resources": [study_id], "Synchronous": True})
        except urllib.error.HTTPError as exc:
            pytest.fail(f"Orthanc's STOW-RS failed: {exc.read()!r}\n{orthanc_dicomweb.log_tail()}")
        with db.session() as s:
            instances = s.scalars(select(Instance)).all()
            requests = s.scalars(select(Association)).all()
            ended = s.scalars(select(AuditEvent).where(AuditEvent.action == "stow.ended")).all()
        assert len(instances) == len(files)
        assert {r.calling_ae for r in requests} == {"ORTHANC"} and all(r.outcome == "released" for r in requests)
        assert sum(r.instances_received for r in requests) == len(files)
        assert {e.details["http_status"] for e in ended} == {200}

        # Assembly as with C-STORE: quiet period, one version, one job.
        assembler = make_assembler(db, clock, settings, publisher)
        clock.advance(settings.quiet_seconds + 1)
        assert len(assembler.tick()) == 1
        with db.session() as s:
            (version,) = s.scalars(select(StudyVersion)).all()
            (job,) = s.scalars(select(Job)).all()
        assert version.instance_count == len(files) and job.study_version_id == version.id

        # Orthanc sending the study again: duplicates, no new rows, no new version.
        orthanc_dicomweb.request("POST", "/dicom-web/servers/medcap/stow", {"Resources": [study_id], "Synchronous": True})
        with db.session() as s:
            assert len(s.scalars(select(Instance)).all()) == len(files)
            assert sum(r.instances_duplicate for r in s.scalars(select(Association)).all()) == len(files)
        clock.advance(settings.quiet_seconds + 1)
        assert assembler.tick() == []
    finally:
        next(running, None)
