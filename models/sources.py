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


#: What a hub snapshot needs for MedCap: configs, weights, tokenizers; never a second copy of the
#: weights in the legacy format (``*.bin`` only when a repository has no safetensors).
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "merges.txt", "vocab.*"]  # .jinja: a processor's chat template


def resolve(source: str, what: str) -> Path:
    """A local path for ``source``: a local directory or file (checked, with a message that says
    what is missing), or a hub id's snapshot (offline, ``HF_HUB_OFFLINE=1``: the local hub cache).

    Every part is then read from files on disk, so a hub id and a local copy load identically,
    tensor by tensor (``models/weights.py``), and get the same sha256 in the model card.
    """
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        if not path.exists():
            raise ComposeError(f"{what}: {path} does not exist")
        return path
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(source, allow_patterns=HUB_FILES))
        if not any(snapshot.glob("*.safetensors")):
            snapshot = Path(snapshot_download(source, allow_patterns=[*HUB_FILES, "*.bin"]))
    except Exception as exc:  # offline and not cached, unknown repository, no network: all end here
        raise ComposeError(f"{what}: {source} is not a local path, and the hub cannot provide it ({type(exc).__name__}: {exc})") from None
    return snapshot


def source_sha(source: Path | str) -> str:
    """sha256 of the weights files of a source (several files: hash of their hashes, sorted by name)."""
    path = Path(source)
    if path.is_file():
        return sha256_file(path)
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")) if path.is_dir() else []
    if not files:
        return "n/a (no weights files)"
    if len(files) == 1:
        return sha256_file(files[0])
    joined = "".join(f"{f.name}:{sha256_file(f)}\n" for f in files)
    return hashlib.sha256(joined.encode()).hexdigest()


def from_pretrained_strict(model_class: Any, resolved: Path, flag: str, what: str) -> Any:
    """``from_pretrained`` that fails on any missing weight instead of initialising it at random."""
    try:
        model, info = model_class.from_pretrained(resolved, output_loading_info=True, dtype=torch.float32)
    except OSError as exc:
        raise ComposeError(f"{flag} {resolved}: cannot load a {what} checkpoint ({exc})") from None
    if info["missing_keys"]:
        raise ComposeError(f"{flag} {resolved}: {len(info['missing_keys'])} weight(s) missing, e.g. {sorted(info['missing_keys'])[:5]}")
    return model
