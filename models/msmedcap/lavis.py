"""The authors' MSMedCap weights as a MedCap checkpoint (``medcap model import-lavis``).

The official code (``AHandsomePython/MSMedCap``, a LAVIS fork) saves checkpoints with LAVIS'
runner: ``{"model": state_dict, "optimizer", "config", "scaler", "epoch"}``, where the state dict
holds the *trainable* weights only (frozen ones are deleted before saving). Names, from
``lavis/models/blip2_models/blip2_opt.py``, ``blip2_qformer.py``, ``blip2.py`` and ``Qformer.py``:

    Qformer.bert.*, query_tokens, opt_proj.*           the CLIP Q-Former (BERT names), its queries, projection
    sam_Qformer.bert.*, sam_query_tokens, sam_opt_proj.*   the SAM Q-Former, the same way
    Qformer.cls.predictions.*  (stage 1)               the ITG head; vision_proj, text_proj, itm_head, temp:
                                                       the ITC/ITM heads of the file's one Q-Former
    ln_vision.*                                        trained in both stages (LAVIS never freezes it)
    visual_encoder.*, opt_model.*, sam_model.*         frozen: present only in a full state dict

Stage 2 deletes the Q-Formers' text side (``cls``, word/position embeddings, text feed-forward
layers), so a stage-2 file makes an inference checkpoint; stage-1 files carry it. What the files
lack comes from the same parts ``medcap model compose`` reads: EVA ViT and OPT from ``--blip2``,
SAM from ``--sam``, the tokenizer (and any text side kept but absent) from ``--bert``. Every model
weight's source is reported, and a file entry that nothing reads is an error, not a silent skip.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models import checkpoint
from models.msmedcap.compose import SAM_RENAMES, bert_names, branch_name, build, fill
from models.msmedcap.inference import export
from models.msmedcap.model import MedCapModel
from models.sources import ComposeError
from models.weights import TensorFiles

Log = Callable[[str], None]
REPORT = "IMPORT_REPORT.md"

#: LAVIS names of the EVA ViT -> transformers' Blip2VisionModel (convert_blip_2_original_to_pytorch.py).
_EVA_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.q_bias$", r"encoder.layers.\1.self_attn.q_bias"),
    (r"^blocks\.(\d+)\.attn\.v_bias$", r"encoder.layers.\1.self_attn.v_bias"),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
]
#: Entries that are read by nothing on purpose: buffers, SAM's prompt side, the ITG decoder tied to the word embeddings.
_IGNORED = re.compile(r"(\.position_ids$|^sam_model\.(prompt_encoder|mask_decoder)\.|cls\.predictions\.decoder\.(weight|bias)$)")
_BRANCH_PREFIX = {"Qformer.": "clip", "sam_Qformer.": "sam"}
_HEADS = ("vision_proj.", "text_proj.", "itm_head.", "temp")


@dataclass
class Coverage:
    """Where every weight of the imported model came from."""

    by_target: dict[str, str] = field(default_factory=dict)  # model weight -> "file.pth: lavis name"
    unused: list[str] = field(default_factory=list)

    def report(self, model: MedCapModel, files: Sequence[Path]) -> str:
        names = list(model.state_dict())
        from_files = [n for n in names if n in self.by_target]
        lines = [
            f"# Import of the authors' LAVIS checkpoint{'s' if len(files) > 1 else ''}",
            "",
            *[f"- `{f}`" for f in files],
            "",
            f"{len(from_files)} of {len(names)} model weights come from the LAVIS file(s); the rest from the parts named in "
            "MODEL_CARD.md (frozen encoders and LM; anything new is listed there).",
            "",
            "| part | weights from LAVIS | of |",
            "|---|---:|---:|",
        ]
        for part in ("branches.clip.", "branches.sam.", "encoders.clip.", "encoders.sam.", "lm."):
            total = [n for n in names if n.startswith(part)]
            if total:
                lines.append(f"| `{part}*` | {sum(n in self.by_target for n in total)} | {len(total)} |")
        lines += [
            "",
            f"Entries read by nothing, on purpose (buffers, SAM's prompt side, the tied ITG decoder): {len(self.unused)}",
            *[f"- `{u}`" for u in self.unused[:50]],
        ]
        return "\n".join(lines) + "\n"


def lavis_target(key: str, file_branch: str | None, *, text_side: bool) -> str | None:
    """The MedCap name of a LAVIS entry (None: read by nothing). ``file_branch``: the branch whose
    Q-Former the file holds, which owns the file's ITC/ITM heads."""
    for prefix, branch in _BRANCH_PREFIX.items():
        if key.startswith(prefix):
            targets = branch_name(bert_names(key), query_path=True, text_side=text_side, query_ffn_from_text=False)
            return f"branches.{branch}.{targets[0]}" if targets else None
    simple = {
        "query_tokens": "branches.clip.query_tokens",
        "sam_query_tokens": "branches.sam.query_tokens",
        "sam_model.shared_image_embedding.positional_embedding": "encoders.sam.positional_gaussian",
    }
    if key in simple:
        return simple[key]
    for prefix, target in (
        ("opt_proj.", "branches.clip.language_projection."),
        ("sam_opt_proj.", "branches.sam.language_projection."),
        ("ln_vision.", "encoders.clip.model.post_layernorm."),
        ("opt_model.", "lm."),
    ):
        if key.startswith(prefix):
            return target + key[len(prefix) :]
    if key.startswith("visual_encoder."):
        rest = key[len("visual_encoder.") :]
        for pattern, replacement in _EVA_RENAMES:
            if re.match(pattern, rest):
                return "encoders.clip.model." + re.sub(pattern, replacement, rest)
        return None
    if key.startswith("sam_model.vision_encoder."):
        return "encoders.sam.model." + key[len("sam_model.") :]
    if key.startswith("sam_model.image_encoder."):  # an original segment-anything model inside
        rest = key[len("sam_model.") :]
        for old, new in SAM_RENAMES:
            rest = rest.replace(old, new)
        return "encoders.sam.model." + rest
    if key.startswith(_HEADS) and file_branch is not None:
        return f"branches.{file_branch}.{key}" if text_side else None
    return None


def _file_branch(keys: set[str], path: Path) -> str | None:
    present = sorted({b for p, b in _BRANCH_PREFIX.items() if any(k.startswith(p) for k in keys)})
    heads = any(k.startswith(_HEADS) for k in keys)
    if heads and len(present) != 1:
        raise ComposeError(f"{path}: ITC/ITM heads beside {present or 'no'} Q-Former(s): cannot tell which Q-Former they belong to")
    return present[0] if present else None


def import_lavis(
    files: Sequence[Path],
    *,
    out: Path,
    blip2: str,
    sam: str | None,
    model_type: str = "msmedcap",
    bert: str = "bert-base-uncased",
    sam_layout: str = "channel",
    eval_image_size: int | None = None,
    keep_text_side: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    name: str = "",
    log: Log = print,
) -> tuple[str, Coverage]:
    """Write a MedCap checkpoint made from LAVIS ``files`` (later files win) to ``out``; returns
    (weights sha256, coverage). An inference checkpoint (frozen parts in ``dtype``, no text side)
    unless ``keep_text_side``: then a training checkpoint, as compose writes."""
    if not files:
        raise ComposeError("import-lavis: give at least one .pth file")
    for path in files:
        if not Path(path).is_file():
            raise ComposeError(f"import-lavis: {path} does not exist")
    model, tokenizers, provenance = build(
        blip2=blip2, sam=sam, model_type=model_type, bert=bert, sam_layout=sam_layout, eval_image_size=eval_image_size, name=name, log=log
    )
    coverage = Coverage()
    own = model.state_dict()
    for path in files:
        log(f"reading {path}")
        tensors = TensorFiles(Path(path))
        keys = tensors.keys()
        file_branch = _file_branch(keys, Path(path))
        values: dict[str, torch.Tensor] = {}
        for key in sorted(keys):
            target = lavis_target(key, file_branch, text_side=True)
            if target is None:
                if _IGNORED.search(key):
                    coverage.unused.append(f"{Path(path).name}: {key}")
                    continue
                raise ComposeError(f"{path}: entry {key} matches no MSMedCap weight (not an MSMedCap/BLIP-2 LAVIS checkpoint?)")
            if target not in own:
                if target.split(".")[1] not in model.branches and target.startswith(("branches.", "encoders.")):
                    raise ComposeError(f"{path}: {key} is for a branch that {model.config.display_name} does not have (--model-type)")
                raise ComposeError(f"{path}: {key} maps to {target}, which the model does not have")
            values[target] = tensors.get(key)
            coverage.by_target[target] = f"{Path(path).name}: {key}"
        _apply(model, values, Path(path))
    _require_query_paths(model, coverage, files)
    provenance.sources.insert(
        0,
        {
            "part": "Q-Formers, queries, projections (the authors' training)",
            "source": ", ".join(map(str, files)),
            "sha256": ", ".join(checkpoint.sha256_file(Path(f)) for f in files),
        },
    )
    provenance.initialised = [line for line in provenance.initialised if not line.startswith(("CLIP Q-Former:", "SAM Q-Former:"))]
    for branch in model.branches:
        new = [n for n in model.branches[branch].state_dict() if f"branches.{branch}.{n}" not in coverage.by_target]
        if not keep_text_side:
            from models.msmedcap.qformer import TEXT_SIDE

            new = [n for n in new if not TEXT_SIDE.match(n)]
        if new:
            provenance.initialised.append(
                f"{branch} branch, not in the LAVIS file(s): {', '.join(new[:8])}{' ...' if len(new) > 8 else ''}"
            )
    staging = out.with_name(out.name + ".importing")
    checkpoint.save(model, tokenizers, staging, provenance)
    if keep_text_side:
        sha = checkpoint.weights_sha256(staging)
        checkpoint.swap_in(staging, out)
    else:
        sha = export(staging, out, dtype=dtype, log=log)
        shutil.rmtree(staging, ignore_errors=True)
    (out / REPORT).write_text(coverage.report(model, [Path(f) for f in files]))
    log(f"wrote {out} (weights sha256 {sha}); {len(coverage.by_target)} weights from LAVIS, see {out / REPORT}")
    return sha, coverage


def _apply(model: MedCapModel, values: dict[str, Any], path: Path) -> None:
    """Put LAVIS tensors into the composed model: the (real) branches by copy, the rest by assignment."""
    by_branch: dict[str, dict[str, torch.Tensor]] = {}
    frozen: dict[str, torch.Tensor] = {}
    for target, value in values.items():
        if target.startswith("branches."):
            _, branch, rest = target.split(".", 2)
            by_branch.setdefault(branch, {})[rest] = value.float()
        else:
            frozen[target] = value
    for branch, part in by_branch.items():
        fill(model.branches[branch], part, f"{path}: {branch} Q-Former", rows_may_differ=False)  # its vocabulary is the tokenizer's
    own = model.state_dict()
    with torch.no_grad():
        for target, value in frozen.items():
            if tuple(value.shape) != tuple(own[target].shape):
                raise ComposeError(f"{path}: {target} has shape {tuple(value.shape)}, the model expects {tuple(own[target].shape)}")
            own[target].copy_(value.to(own[target].dtype))


def _require_query_paths(model: MedCapModel, coverage: Coverage, files: Sequence[Path]) -> None:
    """Each branch's queries and Q-Former query path must come from the files: otherwise this is not their model."""
    for branch in model.branches:
        needed = [
            f"branches.{branch}.query_tokens",
            f"branches.{branch}.qformer.encoder.layer.0.attention.attention.query.weight",
            f"branches.{branch}.qformer.encoder.layer.0.crossattention.attention.key.weight",
        ]
        missing = [n for n in needed if n not in coverage.by_target]
        if missing:
            lavis = {"clip": "Qformer.bert.* and query_tokens", "sam": "sam_Qformer.bert.* and sam_query_tokens"}[branch]
            raise ComposeError(
                f"{', '.join(map(str, files))}: no {lavis} for the {branch} branch (missing e.g. {missing[0]}); "
                "a stage-2 MSMedCap checkpoint has both Q-Formers"
            )
