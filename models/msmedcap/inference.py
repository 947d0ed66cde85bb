"""Inference checkpoints: what a caption worker loads, and nothing else (``medcap model export``).

* The frozen encoders and the LM in bf16: what they run in on a GPU, half of fp32. (fp16 for a
  fleet of older GPUs; loading casts to whatever the device runs anyway.)
* The Q-Formers' query path, their queries and projections in fp32, as HF BLIP-2 keeps them.
* No Q-Former text side (embeddings, text feed-forward layers, ITC/ITM/ITG heads): only stage 1
  uses it, and LAVIS deletes it for stage 2 (about 0.9 GB fp32 at full size).
* Sharded safetensors, converted tensor by tensor: exporting holds one shard in memory, never
  the model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import torch

from models import checkpoint, weights
from models.families import read_config
from models.msmedcap.config import MedCapConfig
from models.msmedcap.model import MedCapModel
from models.msmedcap.qformer import TEXT_SIDE
from models.msmedcap.tokenizers import Tokenizers

#: Parameter prefixes of the frozen parts, stored in the inference dtype.
FROZEN = ("lm.", "encoders.")


def is_text_side(name: str) -> bool:
    """Whether a checkpoint weight belongs to a Q-Former's text side (``branches.<b>.<text side>``)."""
    parts = name.split(".", 2)
    return len(parts) == 3 and parts[0] == "branches" and bool(TEXT_SIDE.match(parts[2]))


def export(
    source: Path,
    out: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = weights.SHARD_BYTES,
    log: Callable[[str], None] = print,
) -> str:
    """Write the inference checkpoint of ``source`` (any MSMedCap-family checkpoint) to ``out``; returns its weights' sha256."""
    config = read_config(Path(source) / "config.json")
    if not isinstance(config, MedCapConfig):
        raise checkpoint.CheckpointError(f"{source}: a {config.model_type} checkpoint; export makes MSMedCap-family inference checkpoints")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype: {dtype} is not bf16, fp16 or fp32")
    target = dataclasses.replace(config, qformer_text=False)
    with weights.empty_weights():
        model = MedCapModel(target)
    files = weights.TensorFiles(Path(source))
    groups = {name: group for group in weights.tied_groups(model) for name in group}
    tied = {name for group in weights.tied_groups(model) for name in group[1:]}
    entries: list[weights.Entry] = []
    used: set[str] = set()
    for name, tensor in model.state_dict().items():
        if name in tied:
            continue
        stored = next((n for n in groups.get(name, [name]) if n in files), None)
        if stored is None:
            raise checkpoint.CheckpointError(f"{source}: weight {name} is missing")
        out_dtype = (dtype if name.startswith(FROZEN) else torch.float32) if tensor.is_floating_point() else tensor.dtype
        nbytes = tensor.numel() * torch.empty((), dtype=out_dtype).element_size()
        entries.append((name, nbytes, partial(files.get, stored, out_dtype)))
        used.update(groups.get(name, [name]))
    stray = sorted(n for n in files.keys() - used if not is_text_side(n))
    if stray:
        raise checkpoint.CheckpointError(f"{source}: weights that no MSMedCap part reads: {stray[:5]}")
    dropped = len(files.keys() - used)
    old = json.loads((Path(source) / "provenance.json").read_text()) if (Path(source) / "provenance.json").is_file() else {}
    provenance = checkpoint.Provenance(
        old.get("sources", []),
        old.get("initialised", []),
        [
            *old.get("history", []),
            {
                "export": "inference",
                "from": str(source),
                "from_weights_sha256": old.get("weights_sha256", "unknown"),
                "frozen_dtype": weights.dtype_name(dtype),
                "text_side_weights_dropped": dropped,
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        ],
    )
    log(
        f"writing {out}: frozen parts in {weights.dtype_name(dtype)}, Q-Former query paths in float32, {dropped} text-side weights left out"
    )
    written = out.with_name(out.name + ".exporting")
    sha = checkpoint.write(target, Tokenizers.load(Path(source)), written, provenance, entries, shard_bytes)
    checkpoint.swap_in(written, out)
    return sha
