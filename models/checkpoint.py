"""MedCap checkpoints: a directory that a captioner is loaded from, and only from.

    config.json           the family's config; its ``model_type`` picks the family (models/families.py)
    model.safetensors     every weight (encoders, adapters, decoder or LM)
    <text files>          the family's tokenizer(s) or vocabulary, e.g. lm_tokenizer/ + qformer_tokenizer/
    MODEL_CARD.md         where the parts came from, with sha256 of each source and of the weights
    provenance.json       the same, machine-readable

Loading is strict: a missing or unexpected weight is an error, never a random layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from models.families import family, read_config

WEIGHTS = "model.safetensors"


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


def save(model: torch.nn.Module, text: Any, directory: Path, provenance: Provenance) -> str:
    """Write a checkpoint of any family (``text``: its tokenizer(s) or vocabulary); returns the sha256 of the weights."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(model.config.to_json())
    save_model(model, str(directory / WEIGHTS))  # stores tied weights (Q-Former LM head, GPT-2 lm_head) once
    text.save(directory)
    weights_sha = sha256_file(directory / WEIGHTS)
    record = provenance.to_dict() | {"weights_sha256": weights_sha, "written_at": datetime.now(UTC).isoformat(timespec="seconds")}
    (directory / "provenance.json").write_text(json.dumps(record, indent=2))
    (directory / "MODEL_CARD.md").write_text(model_card(model.config, record))
    return weights_sha


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
    parts where the family allows (MSMedCap: encoders and LM; Q-Formers stay fp32)."""
    directory = Path(directory)
    for name in ("config.json", WEIGHTS):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name} is missing: {directory} is not a MedCap checkpoint")
    config = read_config(directory / "config.json")
    kind = family(config.model_type)
    model = kind.model(config)
    # load_model knows which tensors save_model stored once for several tied names.
    missing, unexpected = load_model(model, str(directory / WEIGHTS), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / WEIGHTS} does not match its config: {len(missing)} missing weight(s) "
            f"{sorted(missing)[:5]}, {len(unexpected)} unexpected {sorted(unexpected)[:5]}"
        )
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
