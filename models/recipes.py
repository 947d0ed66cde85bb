"""The tiny-model recipe: the synthetic benchmark and the demo model, trained on CPU.

One recipe for all three family members, so that they differ only in their encoders:

1. tokenizers from the training captions; one seeded MSMedCap whose parts every member shares
   (the CLIP encoder and Q-Former of BLIP-2 *are* MSMedCap's, likewise SAM-BLIP2's SAM parts);
2. the tiny LM's stand-in for pretraining (text only), then frozen (``pretrain_language_model``);
3. stage 1 for each Q-Former on its data mix (here both see the same synthetic data);
4. stage 2 for each member, same steps, batch, learning rate and seed.

The other captioners (``train_tiny_captioner``) get the same width, CLIP view size, caption-loss
budget (``stage2_steps`` at ``batch_size``, lr cosine to a tenth) and seed; a GPT-2 gets the same
text-only stand-in for pretraining as the OPT; each keeps its paper's optimiser and, where its
recipe has one (CNN-LSTM, CLIP-Transformer), early stopping on the validation split.
"""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from models import checkpoint
from models.datasets import CaptionRecord
from models.lm_pretraining import pretrain_causal_lm
from models.msmedcap.model import MedCapModel
from models.msmedcap.tiny import tiny_config
from models.msmedcap.tokenizers import build_small_tokenizers
from models.msmedcap.training import TrainSettings, pretrain_language_model, train
from models.progress import Stage


@dataclass(frozen=True)
class TinyRecipe:
    width: int = 64
    layers: int = 2
    num_query_tokens: int = 8
    clip_image_size: int = 64  # coarse global view, as EVA-CLIP's 224 px is against SAM's 1024
    sam_image_size: int = 128
    sam_layout: str = "channel"
    lm_steps: int = 800
    stage1_steps: int = 1000
    stage2_steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0


LM_STAGE = "language model"
STAGE1_BRANCHES = ("clip", "sam")


def stage1_name(branch: str) -> str:
    return f"stage 1, {branch.upper()} Q-Former"


def stage2_name(model_type: str) -> str:
    return f"stage 2, {model_type}"


def tiny_family_stages(recipe: TinyRecipe, model_types: Sequence[str]) -> list[Stage]:
    """The stages :func:`train_tiny_family` runs, in order, with their step counts (for overall progress)."""
    # relative cost of a step, measured on CPU (demo defaults): a language-model step is about a fifth
    # of a stage-1 step (which also encodes the images), a stage-2 step about 0.6 of one
    return [
        Stage(LM_STAGE, recipe.lm_steps, weight=0.2),
        *(Stage(stage1_name(branch), recipe.stage1_steps) for branch in STAGE1_BRANCHES),
        *(Stage(stage2_name(t), recipe.stage2_steps, weight=0.6) for t in model_types),
    ]


def train_tiny_family(
    train_records: Sequence[CaptionRecord],
    out_root: Path,
    recipe: TinyRecipe,
    model_types: Sequence[str] = ("blip2", "sam_blip2", "msmedcap"),
    progress: bool = True,
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Train each requested family member; returns {model_type: checkpoint directory}.

    ``on_stage`` is called with each stage's name (:func:`tiny_family_stages`) as it begins."""
    begin = on_stage or (lambda name: None)
    torch.manual_seed(recipe.seed)
    captions = [r.caption for r in train_records]
    tokenizers = build_small_tokenizers(captions, lm_vocab=400, qformer_vocab=300)
    config = tiny_config(
        "msmedcap",
        lm_vocab=len(tokenizers.lm),
        qformer_vocab=len(tokenizers.qformer),
        width=recipe.width,
        layers=recipe.layers,
        image_size=recipe.clip_image_size,
        sam_image_size=recipe.sam_image_size,
        num_query_tokens=recipe.num_query_tokens,
        sam_layout=recipe.sam_layout,
    )
    base = MedCapModel(config)
    begin(LM_STAGE)
    pretrain_language_model(
        base,
        tokenizers,
        captions,
        steps=recipe.lm_steps,
        lr=recipe.lr,
        seed=recipe.seed,
        max_context=2 * recipe.num_query_tokens,
        progress=progress,
    )
    history = [{"recipe": asdict(recipe), "train_images": len(train_records)}]
    provenance = checkpoint.Provenance(
        sources=[{"part": "all", "source": "tiny recipe, random init", "sha256": "n/a"}],
        initialised=["everything (tiny synthetic benchmark model)"],
        history=history,
    )
    for branch in STAGE1_BRANCHES:
        settings = TrainSettings(
            stage="stage1",
            branch=branch,
            max_steps=recipe.stage1_steps,
            batch_size=recipe.batch_size,
            lr=recipe.lr,
            min_lr=recipe.lr / 10,
            seed=recipe.seed,
        )
        begin(stage1_name(branch))
        train(base, tokenizers, train_records, settings, out_root / f"stage1-{branch}", provenance, progress=progress)
    out: dict[str, Path] = {}
    for model_type in model_types:
        member = MedCapModel(config.with_model_type(model_type))
        member.load_state_dict({k: v for k, v in copy.deepcopy(base.state_dict()).items() if k in member.state_dict()}, strict=True)
        settings = TrainSettings(
            stage="stage2",
            max_steps=recipe.stage2_steps,
            batch_size=recipe.batch_size,
            lr=recipe.lr,
            min_lr=recipe.lr / 10,
            seed=recipe.seed,
        )
        out[model_type] = out_root / model_type
        begin(stage2_name(model_type))
        train(member, tokenizers, train_records, settings, out[model_type], provenance, progress=progress)
    (out_root / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    return out


#: The other captioners of the benchmark: (module, tiny builder, config overrides). Prefix and
#: queries have the same length as one MSMedCap branch's queries.
OTHER_CAPTIONERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "clipcap_mlp": ("models.clipcap", "tiny_clipcap", {"mapper": "mlp", "freeze_lm": False}),
    "clipcap_transformer": ("models.clipcap", "tiny_clipcap", {"mapper": "transformer", "freeze_lm": True}),
    "sbg": ("models.sbg", "tiny_sbg", {}),
    "cnn_lstm": ("models.cnn_lstm", "tiny_cnn_lstm", {}),
    "clip_transformer": ("models.clip_transformer", "tiny_clip_transformer", {}),
}


def train_tiny_captioner(
    kind: str,
    train_records: Sequence[CaptionRecord],
    validation_records: Sequence[CaptionRecord],
    out: Path,
    recipe: TinyRecipe,
    progress: bool = True,
) -> Path:
    """Build one of ``OTHER_CAPTIONERS`` from scratch and train it with the recipe's budget; returns its checkpoint."""
    from models.fitting import FitSettings, fit

    try:
        module, builder, overrides = OTHER_CAPTIONERS[kind]
    except KeyError:
        raise ValueError(f"kind: {kind!r} is not one of {sorted(OTHER_CAPTIONERS)}") from None
    if module == "models.clipcap":
        overrides = overrides | {"prefix_length": recipe.num_query_tokens, "clip_length": recipe.num_query_tokens}
    captions = [r.caption for r in train_records]
    model, text = getattr(importlib.import_module(module), builder)(
        captions, image_size=recipe.clip_image_size, width=recipe.width, seed=recipe.seed, **overrides
    )
    history: list[dict[str, Any]] = [{"recipe": asdict(recipe), "train_images": len(train_records), "builder": f"{builder}({overrides})"}]
    lm = getattr(model, "lm", None)
    if lm is not None:  # GPT-2: the same text-only stand-in for pretraining as the MSMedCap family's OPT
        gpt2 = getattr(text, "gpt2", text)
        sequences = [gpt2.caption_ids(c, 64) for c in captions]
        losses = pretrain_causal_lm(
            lm,
            sequences,
            pad=gpt2.pad_id,
            bos=None,
            steps=recipe.lm_steps,
            lr=recipe.lr,
            seed=recipe.seed,
            max_context=2 * recipe.num_query_tokens,
            progress=progress,
        )
        history.append({"stage": "lm stand-in", "steps": recipe.lm_steps, "last_loss": losses[-1]})
    defaults = FitSettings.for_model(model.config.model_type)
    early = defaults.patience is not None and bool(validation_records)
    settings = FitSettings.for_model(
        model.config.model_type,
        epochs=10_000,
        max_steps=recipe.stage2_steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        min_lr=recipe.lr / 10,
        warmup_steps=0,
        seed=recipe.seed,
    )
    if not early:
        settings = FitSettings(**(asdict(settings) | {"patience": None}))
    provenance = checkpoint.Provenance(
        sources=[{"part": "all", "source": "tiny recipe, random init", "sha256": "n/a"}],
        initialised=["everything (tiny synthetic benchmark model)"],
        history=history,
    )
    fit(model, text, train_records, settings, out, provenance, validation_records=validation_records if early else (), progress=progress)
    return out
