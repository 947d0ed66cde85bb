"""Durable, all-or-nothing file writes: a reader sees the whole file or none of it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

Chunk = bytes | memoryview


def write_atomic(path: Path, *chunks: Chunk) -> None:
    """Write the chunks to ``path`` via a temporary file, fsync, rename, and fsync of the directory.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            _write_all(fd, [memoryview(c) for c in chunks])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def _write_all(fd: int, views: list[memoryview]) -> None:
    while views:
        written = os.writev(fd, views)
        while views and written >= views[0].nbytes:  # drop what went out whole
            written -= views[0].nbytes
            views.pop(0)
        if written:
            views[0] = views[0][written:]


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
