"""A small real FHIR R4 HTTP server for the tests: the DiagnosticReport interactions MedCap uses, every
resource it is sent validated against the FHIR models of ``fhir.resources`` (R4B, R4's DiagnosticReport).

No full FHIR server installs here (HAPI and the other servers are Java or .NET builds, or need a
database and a network install; ``@asymmetrik/node-fhir-server-core`` is a framework without storage),
so this one runs in the test process on a port of its own: search by identifier, conditional create
(``If-None-Exist``), update by id with ``If-Match`` versions, read, an optional bearer token, and
answers a test can force (``fail_next``, ``fail_writes``) to play a server that is down or refuses.
"""

from __future__ import annotations

import json
import ssl
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydantic import ValidationError

from tests.conftest import free_port
from tests.tiers import requires


class FhirServer:
    def __init__(self, token: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.port = free_port()
        self.token = token
        self.tls = tls  # serve HTTPS with this context (e.g. one that requires client certificates)
        self.resources: dict[str, dict[str, Any]] = {}  # id -> the stored DiagnosticReport (with meta.versionId)
        self.history: list[dict[str, Any]] = []  # every version written, in order
        self.requests: list[tuple[str, str]] = []  # (method, path with query)
        self.fail_next: list[int] = []  # statuses to answer the next requests with, in order
        self.fail_writes: list[int] = []  # the same, for the next creates and updates only
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None

    @property
    def base(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/fhir"

    @property
    def destination(self) -> str:
        return f"fhir+{self.base}"

    def start(self) -> None:
        requires("peers")
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        if self.tls is not None:
            self.httpd.socket = self.tls.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def find(self, token: str) -> list[dict[str, Any]]:
        system, _, value = token.partition("|")
        return [
            r
            for r in self.resources.values()
            if any(i.get("system") == system and i.get("value") == value for i in r.get("identifier", []))
        ]


def outcome(status: int, text: str) -> tuple[int, dict[str, Any]]:
    return status, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid", "diagnostics": text}]}


def _handler(server: FhirServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _answer(self, status: int, body: dict[str, Any] | None, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _route(self, method: str) -> None:
            url = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with server.lock:
                server.requests.append((method, self.path))
                if server.fail_next or (method != "GET" and server.fail_writes):
                    status = (server.fail_next or server.fail_writes).pop(0)
                    return self._answer(*outcome(status, f"forced answer {status}"))
                if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                    return self._answer(*outcome(401, "missing or wrong bearer token"))
                parts = url.path.removeprefix("/fhir/").split("/")
                if parts[0] != "DiagnosticReport" or len(parts) > 2:
                    return self._answer(*outcome(404, f"no such resource type or path: {url.path}"))
                query = urllib.parse.parse_qs(url.query)
                if method == "GET" and len(parts) == 1:
                    found = server.find(query.get("identifier", [""])[0])
                    bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(found), "entry": [{"resource": r} for r in found]}
                    return self._answer(200, bundle)
                if method == "GET":
                    if parts[1] not in server.resources:
                        return self._answer(*outcome(404, f"DiagnosticReport/{parts[1]} not found"))
                    return self._answer(200, server.resources[parts[1]])
                try:
                    resource = json.loads(body)
                    DiagnosticReport.model_validate(resource)  # the FHIR model's own validation
                except (ValueError, ValidationError) as exc:
                    return self._answer(*outcome(400, f"not a valid DiagnosticReport: {exc}"))
                if method == "POST" and len(parts) == 1:
                    condition = urllib.parse.parse_qs(self.headers.get("If-None-Exist") or "").get("identifier", [""])[0]
                    existing = server.find(condition) if condition else []
                    if existing:
                        return self._answer(200, existing[0])
                    new_id = str(len(server.resources) + 1)
                    return self._store(new_id, resource, 201)
                if method == "PUT" and len(parts) == 2:
                    current = server.resources.get(parts[1])
                    if resource.get("id") != parts[1]:
                        return self._answer(*outcome(400, "the resource's id must match the URL"))
                    wanted = self.headers.get("If-Match")
                    if current is not None and wanted and wanted != f'W/"{current["meta"]["versionId"]}"':
                        return self._answer(*outcome(412, f"version conflict: {wanted} is not the current version"))
                    return self._store(parts[1], resource, 200 if current else 201)
                return self._answer(*outcome(405, f"{method} {url.path} is not supported here"))

        def _store(self, resource_id: str, resource: dict[str, Any], status: int) -> None:
            previous = server.resources.get(resource_id)
            version = int(previous["meta"]["versionId"]) + 1 if previous else 1
            stored = {**resource, "id": resource_id, "meta": {"versionId": str(version)}}
            server.resources[resource_id] = stored
            server.history.append(stored)
            location = f"{server.base}/DiagnosticReport/{resource_id}/_history/{version}"
            self._answer(status, stored, {"Location": location, "ETag": f'W/"{version}"'})

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_PUT(self) -> None:
            self._route("PUT")

    return Handler
