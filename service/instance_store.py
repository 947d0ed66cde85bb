"""Where received instances live on disk, and the free-space reserve that protects them."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

from dicom_io.atomic import Chunk, write_atomic
from dicom_io.instance import InstanceHeader
from dicom_io.part10 import Part10

MB = 1024 * 1024


class InstanceStore:
    """``instances/<study>/<series>/<sop>.<sha16>.dcm`` under the data dir, plus a quarantine.

    The content hash in the name means two different payloads for one SOP Instance UID
    never overwrite each other, and a re-sent identical payload lands on the same name.
    UIDs are validated digits and dots before they reach a path.
    """

    def __init__(self, root: Path, quarantine: Path, min_free_bytes: int) -> None:
        self.root = root
        self.quarantine_root = quarantine
        self.min_free_bytes = min_free_bytes
        root.mkdir(parents=True, exist_ok=True)
        quarantine.mkdir(parents=True, exist_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def has_room(self, incoming_bytes: int = 0) -> bool:
        return self.free_bytes() - incoming_bytes >= self.min_free_bytes

    def path_for(self, header: InstanceHeader, sha256: str) -> Path:
        return self.root / header.study_uid / header.series_uid / f"{header.sop_instance_uid}.{sha256[:16]}.dcm"

    def write(self, path: Path, *chunks: Chunk) -> None:
        write_atomic(path, *chunks)

    def quarantine(self, instance: Part10, association_id: int | None, now: datetime) -> Path:
        """Keep refused input for inspection: nothing a peer sent is silently dropped."""
        path = self.quarantine_root / now.strftime("%Y%m%d") / f"assoc{association_id}-{instance.sha256[:16]}.dcm"
        write_atomic(path, *instance.chunks)
        return path
