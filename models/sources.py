"""Where pretrained parts come from: hub ids or local paths, loaded strictly, with their sha256.

Every family's ``compose`` goes through these, so a missing path or a missing weight reads the
same everywhere: an error naming the flag and what is missing, never a random layer.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import sha256_file


class ComposeError(RuntimeError):
    pass


def resolve(source: str, what: str) -> Path | str:
    """Local directories/files are checked first, with a message that says what is missing."""
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")):
        if not path.exists():
            raise ComposeError(f"{what}: {path} does not exist")
        return path
    return source  # a hub id; offline (HF_HUB_OFFLINE=1) it must be in the local cache


def source_sha(source: Path | str) -> str:
    """sha256 of the weights files of a source (several files: hash of their hashes, sorted by name)."""
    path = Path(source)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if files:
            if len(files) == 1:
                return sha256_file(files[0])
            joined = "".join(f"{f.name}:{sha256_file(f)}\n" for f in files)
            return hashlib.sha256(joined.encode()).hexdigest()
    return "unknown (hub cache)"


def from_pretrained_strict(model_class: Any, resolved: Path | str, flag: str, what: str) -> Any:
    """``from_pretrained`` that fails on any missing weight instead of initialising it at random."""
    try:
        model, info = model_class.from_pretrained(resolved, output_loading_info=True, dtype=torch.float32)
    except OSError as exc:
        raise ComposeError(f"{flag} {resolved}: cannot load a {what} checkpoint ({exc})") from None
    if info["missing_keys"]:
        raise ComposeError(f"{flag} {resolved}: {len(info['missing_keys'])} weight(s) missing, e.g. {sorted(info['missing_keys'])[:5]}")
    return model


