"""The SR sent by DICOMweb STOW-RS (PS3.18 10.5) to an archive: ``stow-rs+http(s)://host[:port]/root``.

The artefact is the SR file itself, as for C-STORE. One attempt is one POST of
``multipart/related; type="application/dicom"`` to ``<root>/studies/<study>``; the answer's
ReferencedSOPSequence / FailedSOPSequence give each instance's outcome, recorded like a C-STORE
status. 200 (stored) is delivered; 202 or 409 with the SR among the failures is a refusal; 408,
429 and 5xx, or no answer, are retried.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

import httpx

from service.outputs.http_peer import HttpPeer, base_url, refused, transport_failure
from service.outputs.kind import Artefact, Delivery, OutputKind
from service.schema import SRDocument
from service.storage import Storage, StorageError

if TYPE_CHECKING:
    from service.settings import Settings

PREFIX = "stow-rs"
# DICOM JSON tags of a STOW-RS response (PS3.18 Table 10.5.3-1)
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"


class StowRS(OutputKind):
    name = "stow-rs"
    media_type = "application/dicom"

    def __init__(self, peer: HttpPeer | None = None, *, storage: Storage | None = None) -> None:
        self.peer = peer or HttpPeer()
        self.storage = storage or Storage("medcap-data")

    @classmethod
    def from_settings(cls, settings: Settings) -> StowRS:
        auth = settings.stow_rs_authorization
        peer = HttpPeer(
            auth.get_secret_value() if auth else None,
            settings.output_tls_ca_file,
            settings.output_tls_cert_file,
            settings.output_tls_key_file,
            settings.dispatch_timeout_seconds,
        )
        return cls(peer, storage=settings.storage)

    def accepts(self, destination: str) -> bool:
        try:
            base_url(destination, PREFIX)
        except ValueError:
            return False
        return True

    def build(self, report: SRDocument) -> Artefact:
        return Artefact(self.storage.recorded(report.path), self.media_type, report.sha256)  # the SR file is the artefact

    def send(self, artefact: Artefact, destination: str) -> Delivery:
        try:
            root = base_url(destination, PREFIX)
            data = self.storage.read_bytes(artefact.path)
            header = self.storage.read_dataset(artefact.path, stop_before_pixels=True)
        except (ValueError, StorageError, OSError) as exc:  # StorageError is a ValueError: a missing SR is not retried
            return Delivery(delivered=False, retryable=False, summary=str(exc))
        sop_uid, study_uid = str(header.SOPInstanceUID), str(header.StudyInstanceUID)
        boundary = f"medcap-{secrets.token_hex(16)}"
        body = b"".join(
            [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii"), data, f"\r\n--{boundary}--\r\n".encode("ascii")]
        )
        url = f"{root}/studies/{study_uid}"
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        try:
            with self.peer.client() as client:
                response = client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return transport_failure(exc, url)
        return judge(response, sop_uid)


def judge(response: httpx.Response, sop_uid: str) -> Delivery:
    """What a STOW-RS answer says about our one instance."""
    try:
        answer: Any = response.json() if response.content else None
    except ValueError:
        answer = None
    stored, failed = _outcomes(answer)
    if response.status_code in (200, 202) and sop_uid in stored and sop_uid not in failed:
        warning = stored[sop_uid]
        items = ({"sop_instance_uid": sop_uid, "status": f"HTTP {response.status_code}", "warning": warning},)
        return Delivery(delivered=True, retryable=False, summary=f"stored by STOW-RS (HTTP {response.status_code})", items=items)
    if sop_uid in failed:
        reason = failed[sop_uid]
        items = ({"sop_instance_uid": sop_uid, "status": f"HTTP {response.status_code}", "failure_reason": reason},)
        retryable = response.status_code in (429, 503) or reason in (0xA700, 0xA7FF)  # out of resources: may pass later
        return Delivery(
            delivered=False,
            retryable=retryable,
            summary=f"STOW-RS failed the SR: HTTP {response.status_code}, failure reason {_hex(reason)}",
            items=items,
        )
    if response.status_code == 200 and answer is None:
        # a bare 200 (some archives answer without a body): stored
        return Delivery(
            delivered=True,
            retryable=False,
            summary="stored by STOW-RS (HTTP 200, no response body)",
            items=({"sop_instance_uid": sop_uid, "status": "HTTP 200"},),
        )
    if response.is_success:
        return Delivery(
            delivered=False,
            retryable=True,
            summary=f"STOW-RS answered HTTP {response.status_code} without naming the SR",
            items=({"sop_instance_uid": sop_uid, "status": f"HTTP {response.status_code}"},),
        )
    return refused(response, "STOW-RS")


def _outcomes(answer: Any) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """SOP Instance UID → warning reason of the stored ones, and → failure reason of the failed ones."""
    if not isinstance(answer, dict):
        return {}, {}

    def items(tag: str, reason_tag: str) -> dict[str, int | None]:
        found: dict[str, int | None] = {}
        for item in (answer.get(tag) or {}).get("Value") or []:
            uid = ((item.get(REFERENCED_SOP_INSTANCE_UID) or {}).get("Value") or [None])[0]
            reason = ((item.get(reason_tag) or {}).get("Value") or [None])[0]
            if isinstance(uid, str):
                found[uid] = reason if isinstance(reason, int) else None
        return found

    return items(REFERENCED_SOP_SEQUENCE, WARNING_REASON), items(FAILED_SOP_SEQUENCE, FAILURE_REASON)


def _hex(reason: int | None) -> str:
    return "unknown" if reason is None else f"0x{reason:04X}"
