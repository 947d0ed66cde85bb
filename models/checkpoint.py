"""MedCap checkpoints: a directory that a captioner is loaded from, and only from.

    config.json           the family's config; its ``model_type`` picks the family (models/families.py)
    model.safetensors     every weight (encoders, adapters, decoder or LM); a large model is
                          sharded instead: model-0000N-of-0000M.safetensors + model.safetensors.index.json
    <text files>          the family's tokenizer(s) or vocabulary, e.g. lm_tokenizer/ + qformer_tokenizer/
    MODEL_CARD.md         where the parts came from, with sha256 of each source and of the weights
    provenance.json       the same, machine-readable

Loading is strict: a missing or unexpected weight is an error, never a random layer. It is also
lean: the model is built without memory (meta device) and takes each stored tensor as it is, so
loading never holds a random copy of the model beside the real one (``models/weights.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from models import weights
from models.families import family, read_config

WEIGHTS = weights.SINGLE_FILE


class CheckpointError(RuntimeError):
    pass


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Provenance:
    """What a checkpoint was made from, and how."""

    sources: list[dict[str, Any]] = field(default_factory=list)  # {"part", "source", "sha256", ...}
    initialised: list[str] = field(default_factory=list)  # parts that start untrained, said out loud
    history: list[dict[str, Any]] = field(default_factory=list)  # training runs etc.

    def to_dict(self) -> dict[str, Any]:
        return {"sources": self.sources, "initialised": self.initialised, "history": self.history}


def save(
    model: torch.nn.Module,
    text: Any,
    directory: Path,
    provenance: Provenance,
    *,
    dtype_of: Callable[[str, torch.Tensor], torch.dtype] | None = None,
    skip: Callable[[str], bool] | None = None,
    shard_bytes: int = weights.SHARD_BYTES,
) -> str:
    """Write a checkpoint of any family (``text``: its tokenizer(s) or vocabulary); returns the sha256 of the weights.

    ``dtype_of(name, tensor)`` stores floating-point weights in another dtype (inference
    checkpoints: frozen parts in bf16); ``skip(name)`` leaves weights out (the config must then
    describe a model without them).
    """
    # Tied weights (Q-Former LM head, GPT-2/OPT lm_head) are stored once.
    entries = weights.model_entries(model, dtype_of=dtype_of, skip=skip or (lambda _: False))
    return write(model.config, text, directory, provenance, entries, shard_bytes)


def write(
    config: Any, text: Any, directory: Path, provenance: Provenance, entries: list[weights.Entry], shard_bytes: int = weights.SHARD_BYTES
) -> str:
    """Write a checkpoint from a config, a text codec and a weights plan (``models/weights.py``);
    returns the sha256 of the weights."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(config.to_json())
    weights.write_shards(entries, directory, shard_bytes)
    text.save(directory)
    weights_sha = weights_sha256(directory)
    record = provenance.to_dict() | {"weights_sha256": weights_sha, "written_at": datetime.now(UTC).isoformat(timespec="seconds")}
    (directory / "provenance.json").write_text(json.dumps(record, indent=2))
    (directory / "MODEL_CARD.md").write_text(model_card(config, record))
    return weights_sha


def weights_sha256(directory: Path) -> str:
    """sha256 of ``model.safetensors``; of a sharded checkpoint, sha256 over each shard's name and sha256."""
    files = weights.weight_files(directory)
    if len(files) == 1:
        return sha256_file(files[0])
    joined = "".join(f"{f.name}:{sha256_file(f)}\n" for f in files)
    return hashlib.sha256(joined.encode()).hexdigest()


def swap_in(written: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` with the fully written sibling ``written``: a reader never sees half a checkpoint."""
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(written, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def load(directory: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Load a checkpoint strictly: (model, text codec, provenance). ``dtype`` applies to the frozen
    parts where the family allows (MSMedCap: encoders and LM; Q-Formers stay fp32).

    The model is built on the meta device and takes the stored tensors as they are (no random
    copy, no second copy); ``place`` then casts each part on the CPU and moves it to ``device``,
    so the device never holds a part in a wider dtype than it will run in.
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file() or not weights.weight_files(directory):
        missing = "config.json" if not (directory / "config.json").is_file() else f"{WEIGHTS} (or {weights.INDEX})"
        raise CheckpointError(f"{directory / missing} is missing: {directory} is not a MedCap checkpoint")
    config = read_config(directory / "config.json")
    kind = family(config.model_type)
    with weights.empty_weights():
        model = kind.model(config)
    try:
        weights.assign(model, weights.read_checkpoint(directory), what=f"{directory} does not match its config")
    except weights.WeightsError as exc:
        raise CheckpointError(str(exc)) from None
    model.place(torch.device(device), dtype)
    model.eval()  # loaded for inference; training switches it back
    provenance = json.loads((directory / "provenance.json").read_text()) if (directory / "provenance.json").is_file() else {}
    return model, kind.text.load(directory), provenance


def model_card(config: Any, record: dict[str, Any]) -> str:
    lines = [
        f"# {config.display_name} — MedCap checkpoint",
        "",
        *config.summary(),
        f"- weights sha256: `{record['weights_sha256']}`",
        "",
        "Drafts from this model are **preliminary and unverified**: a radiologist must review them.",
        "",
        "## Sources",
        "",
    ]
    lines += [f"- {s.get('part')}: `{s.get('source')}` (sha256 `{s.get('sha256', 'n/a')}`)" for s in record["sources"]] or ["- none"]
    lines += ["", "## Initialised without pretrained weights", ""]
    lines += [f"- {part}" for part in record["initialised"]] or ["- nothing"]
    if record["history"]:
        lines += ["", "## History", ""] + [f"- {json.dumps(h, sort_keys=True)}" for h in record["history"]]
    return "\n".join(lines) + "\n"
