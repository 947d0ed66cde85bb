"""docker/compose.yaml run with podman-compose, and what a test needs to drive and look into it.

podman 4.3 (Debian 12) runs health checks only when asked (it starts them with systemd timers,
and these machines have no systemd), podman-compose ignores ``service_healthy`` before podman 4.6,
and podman 4.3 cannot start a container whose ``--requires`` (podman-compose's translation of
``depends_on``) names an exited one such as ``migrate``. So :meth:`Stack.up` does what compose's
conditions say, one step at a time with ``--no-deps``: the database, broker and PACS until their
health checks pass (``podman healthcheck run``), then ``migrate`` until it exits 0, then the rest
until theirs pass.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

DOCKER = Path(__file__).resolve().parents[2] / "docker"
INFRASTRUCTURE = ("postgres", "redis", "orthanc")
MEDCAP = ("listener", "web", "worker-caption", "worker-dispatch")
#: Published host ports (compose.yaml's variables), all on 127.0.0.1: PostgreSQL and Redis publish none.
PORT_VARIABLES = (
    "LISTENER_HOST_PORT",
    "WEB_HOST_PORT",
    "ORTHANC_HTTP_HOST_PORT",
    "ORTHANC_DICOM_HOST_PORT",
    "LISTENER_METRICS_HOST_PORT",
    "CAPTION_METRICS_HOST_PORT",
    "DISPATCH_METRICS_HOST_PORT",
)


class StackError(AssertionError):
    pass


def wait_for(condition: Callable[[], Any], what: str, timeout: float, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Stack:
    """One compose project: ``podman-compose -p PROJECT -f FILE...`` with ``env``."""

    def __init__(self, project: str, files: Sequence[Path], env: dict[str, str], log: Path) -> None:
        self.project = project
        self.files = list(files)
        self.env = env
        self.log = log

    def _run(self, argv: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        with self.log.open("a") as f:
            f.write(f"$ {' '.join(argv)}  # rc {result.returncode}, {time.monotonic() - started:.1f} s\n{result.stdout}{result.stderr}\n")
        if check and result.returncode != 0:
            raise StackError(f"{' '.join(argv)} failed ({result.returncode}):\n{(result.stdout + result.stderr)[-4000:]}")
        return result

    def compose(self, *args: str, timeout: float = 600) -> str:
        files = [a for f in self.files for a in ("-f", str(f))]
        return self._run([sys.executable, "-m", "podman_compose", "-p", self.project, *files, *args], timeout).stdout

    def podman(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run(["podman", *args], timeout, check)

    def container(self, service: str) -> str:
        names = self.podman(
            "ps",
            "-a",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
            "--filter",
            f"label=com.docker.compose.service={service}",
            "--format",
            "{{.Names}}",
        ).stdout.split()
        if len(names) != 1:
            raise StackError(f"{service}: expected one container, found {names}")
        return names[0]

    def state(self, service: str) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.podman("inspect", "--format", "{{json .State}}", self.container(service)).stdout)
        return state

    def healthy(self, service: str) -> bool:
        """Run the container's own health check once (podman records the result)."""
        return self.podman("healthcheck", "run", self.container(service), check=False, timeout=60).returncode == 0

    def wait_healthy(self, services: Iterable[str], timeout: float) -> dict[str, float]:
        """Seconds until each service's health check first passed."""
        started, took = time.monotonic(), {}
        for service in services:
            wait_for(functools.partial(self.healthy, service), f"{service}'s health check to pass", timeout, interval=2)
            took[service] = round(time.monotonic() - started, 1)
        return took

    def up(self, timeout: float = 300) -> dict[str, float]:
        """Start the stack in the order compose.yaml's conditions give; seconds until each was ready."""
        started = time.monotonic()
        self.compose("up", "-d", "--no-deps", *INFRASTRUCTURE)
        took = self.wait_healthy(INFRASTRUCTURE, timeout)
        self.compose("up", "-d", "--no-deps", "migrate")
        exit_code = self.podman("wait", self.container("migrate"), timeout=timeout).stdout.strip()
        if exit_code != "0":
            raise StackError(f"migrate exited with {exit_code}:\n{self.logs('migrate')}")
        took["migrate"] = round(time.monotonic() - started, 1)
        self.compose("up", "-d", "--no-deps", *MEDCAP)
        took.update({s: round(t + took["migrate"], 1) for s, t in self.wait_healthy(MEDCAP, timeout).items()})
        return took

    def down(self, *, volumes: bool = False) -> None:
        self.compose("down", *(["--volumes"] if volumes else []), timeout=300)

    def volume_exists(self, name: str) -> bool:
        return self.podman("volume", "exists", f"{self.project}_{name}", check=False).returncode == 0

    def exec(self, service: str, *argv: str, timeout: float = 60) -> str:
        return self.podman("exec", self.container(service), *argv, timeout=timeout).stdout

    def sql(self, query: str) -> list[list[str]]:
        """Rows of a query on the audit database, through psql in the postgres container."""
        out = self.exec("postgres", "psql", "-U", "medcap", "-d", "medcap", "-tA", "-F", "|", "-c", query)
        return [line.split("|") for line in out.splitlines() if line]

    @property
    def orthanc(self) -> OrthancREST:
        return OrthancREST(int(self.env["ORTHANC_HTTP_HOST_PORT"]))

    def logs(self, service: str, tail: int = 60) -> str:
        result = self.podman("logs", "--tail", str(tail), self.container(service), check=False)
        return result.stdout + result.stderr


class OrthancREST:
    """The Orthanc container's REST API on its published port."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, body: bytes | dict[str, Any] | None = None, timeout: float = 120) -> Any:
        headers = {}
        if isinstance(body, dict):
            body, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def upload(self, files: Iterable[Path]) -> str:
        """Store the files; returns Orthanc's id of the (one) study they make."""
        studies = {self.request("POST", "/instances", path.read_bytes())["ParentStudy"] for path in files}
        if len(studies) != 1:
            raise StackError(f"expected one study, got {studies}")
        return studies.pop()

    def sr_instances(self, study_uid: str) -> list[str]:
        found: list[str] = self.request(
            "POST", "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}}
        )
        return found

    def file(self, instance: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}/instances/{instance}/file", timeout=30) as response:
            data: bytes = response.read()
        return data
