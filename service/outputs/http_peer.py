"""What the HTTP output kinds (STOW-RS, FHIR) share: the connection settings and how an answer is judged.

A destination is written with its kind in the scheme (``stow-rs+https://pacs/dicom-web``); the
request goes to the URL without that prefix. Credentials are an Authorization header from the
settings, never part of the stored destination (dispatches and audit events show it).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx

from service.outputs.kind import Delivery

#: answers worth another attempt: the peer is busy, restarting or timed out; any other 4xx is a refusal
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class HttpPeer:
    """How to reach the HTTP destinations of one kind."""

    authorization: str | None = None  # the Authorization header's value
    ca_file: Path | None = None  # verifies https peers; None: the system's CAs
    cert_file: Path | None = None  # client certificate (mutual TLS), with its key
    key_file: Path | None = None
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("HttpPeer.cert_file and key_file must be given together")
        if self.timeout <= 0:
            raise ValueError(f"HttpPeer.timeout must be positive, got {self.timeout}")

    def client(self) -> httpx.Client:
        headers = {"Authorization": self.authorization} if self.authorization else {}
        return httpx.Client(verify=self._tls(), timeout=self.timeout, headers=headers, follow_redirects=False)

    def _tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None and self.key_file is not None:
            context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context


def base_url(destination: str, prefix: str) -> str:
    """``stow-rs+https://host/root`` → ``https://host/root`` (no trailing slash)."""
    if not destination.startswith(prefix + "+http"):
        raise ValueError(f"{destination!r} is not a {prefix}+http(s):// destination")
    url = destination.removeprefix(prefix + "+").rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{destination!r} is not a {prefix}+http(s):// destination")
    return url


def transport_failure(exc: Exception, url: str) -> Delivery:
    """The peer could not be reached or did not answer in time: worth another attempt, except a TLS failure."""
    if isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError) or "CERTIFICATE" in str(exc).upper():
        return Delivery(delivered=False, retryable=False, summary=f"TLS with {url} failed: {exc}")
    return Delivery(delivered=False, retryable=True, summary=f"{url} unreachable: {type(exc).__name__}: {exc}")


def refused(response: httpx.Response, what: str, detail: str = "") -> Delivery:
    """An error answer: retried when the peer may take it later (busy, down), otherwise a refusal."""
    retryable = response.status_code in RETRYABLE_STATUS
    body = detail or response.text[:300].strip()
    return Delivery(
        delivered=False,
        retryable=retryable,
        summary=f"{what}: HTTP {response.status_code} {response.reason_phrase}{': ' + body if body else ''}",
        items=({"http_status": response.status_code},),
    )
