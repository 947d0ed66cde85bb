"""The first output kind: the report's own DICOM SR, sent by C-STORE to a PACS (``AE@host:port``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_io.store_scu import Destination, DispatchResult, send
from service.outputs.kind import Artefact, Delivery, OutputKind
from service.schema import SRDocument
from service.storage import Storage, StorageError

if TYPE_CHECKING:
    from service.settings import Settings

Sender = Callable[[Destination, list[Path]], DispatchResult]


class DicomSR(OutputKind):
    name = "dicom-sr"
    media_type = "application/dicom"

    def __init__(
        self, resolve: Callable[[str], Destination] = Destination.parse, sender: Sender = send, *, storage: Storage | None = None
    ) -> None:
        self.resolve = resolve  # a stored destination string -> a Destination with today's TLS settings
        self.sender = sender
        self.storage = storage or Storage("medcap-data")  # where the SR files are read from: the settings' data dir

    @classmethod
    def from_settings(cls, settings: Settings) -> DicomSR:
        return cls(
            settings.destination,
            lambda destination, paths: send(
                destination, paths, calling_ae=settings.dicom_ae_title, timeout=settings.dispatch_timeout_seconds
            ),
            storage=settings.storage,
        )

    def accepts(self, destination: str) -> bool:
        try:
            Destination.parse(destination)
        except ValueError:
            return False
        return True

    def build(self, report: SRDocument) -> Artefact:
        return Artefact(Path(report.path), self.media_type, report.sha256)  # the SR file is the artefact

    def send(self, artefact: Artefact, destination: str) -> Delivery:
        try:
            peer = self.resolve(destination)
        except ValueError as exc:  # a destination no longer parseable, TLS files gone
            return Delivery(delivered=False, retryable=False, summary=str(exc))
        try:
            path = self.storage.existing(artefact.path, "SR file")
        except StorageError as exc:  # missing, or recorded outside the data dir
            return Delivery(delivered=False, retryable=False, summary=str(exc))
        result = self.sender(peer, [path])
        items = tuple(
            {"sop_instance_uid": o.sop_instance_uid, "status": o.status, "category": str(o.category), "error": o.error}
            for o in result.outcomes
        )
        return Delivery(delivered=result.delivered, retryable=result.retryable, summary=result.summary, items=items)
