"""Training both stages, with progress bars, periodic checkpoints and resume.

Encoders and the LM are frozen, so image features are computed once per image (in batches,
with a progress bar) and reused every epoch — the notes' main lever on training cost.

The output directory *is* a MedCap checkpoint (loadable with ``--model DIR``), plus
``training_state.pt`` (optimiser, schedule, step, RNG) for ``--resume``.
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from models import checkpoint
from models.datasets import CaptionRecord
from models.features import Features, ImageTransform, encode_images, image_transform_for
from models.fitting import decay_groups, restore_state
from models.lm_pretraining import pretrain_causal_lm
from models.msmedcap.model import MedCapModel
from models.msmedcap.stage1 import stage1_losses
from models.msmedcap.tokenizers import Tokenizers

STATE = "training_state.pt"


@dataclass
class TrainSettings:
    stage: str  # stage1 | stage2
    branch: str | None = None  # stage 1: clip | sam
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 0
    #: Where the linear warm-up starts (LAVIS ``warmup_lr``).
    warmup_lr: float = 1e-6
    #: AdamW weight decay, on matrices only: biases, norms, the ITC temperature are exempt (LAVIS).
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0 = only at the end
    feature_batch_size: int = 16
    feature_cache: str = "memory"  # memory | disk (fp16 memory-mapped, beside the output directory)

    def __post_init__(self) -> None:
        if self.stage not in ("stage1", "stage2"):
            raise ValueError(f"stage: {self.stage!r} is not stage1 or stage2")
        if self.stage == "stage1" and self.branch not in ("clip", "sam"):
            raise ValueError("branch: stage 1 trains one Q-Former, --qformer clip or sam")
        if self.batch_size < (2 if self.stage == "stage1" else 1):
            raise ValueError("batch_size: stage 1 needs at least 2 (every sample needs a negative)")
        for name in ("epochs", "feature_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        if self.feature_cache not in ("memory", "disk"):
            raise ValueError(f"feature_cache: {self.feature_cache!r} is not memory or disk")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError("lr/min_lr: need 0 <= min_lr <= lr and lr > 0")
        if self.warmup_steps < 0 or not 0 <= self.warmup_lr <= self.lr:
            raise ValueError("warmup_steps/warmup_lr: need warmup_steps >= 0 and 0 <= warmup_lr <= lr")

    @classmethod
    def for_stage(cls, stage: str, **overrides: Any) -> TrainSettings:
        """The stage's defaults (:data:`STAGE_DEFAULTS`), then every override that is not None."""
        return cls(stage=stage, **(STAGE_DEFAULTS[stage] | {k: v for k, v in overrides.items() if v is not None}))


#: Each stage's defaults: the MSMedCap paper and its LAVIS configs (``pretrain_stage1.yaml``,
#: ``pretrain_stage2.yaml``): cosine 1e-4 -> 1e-5 after a linear warm-up from 1e-6, AdamW with
#: weight decay 0.05; batch 8 = the authors' 4-8 per GPU x 2 GPUs. docs/msmedcap.md has the table.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "stage1": {"epochs": 3, "batch_size": 8, "lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 5000, "warmup_lr": 1e-6, "weight_decay": 0.05},
    "stage2": {"epochs": 5, "batch_size": 8, "lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 2000, "warmup_lr": 1e-6, "weight_decay": 0.05},
}


@dataclass
class TrainResult:
    steps: int
    losses: list[dict[str, float]] = field(default_factory=list)
    out_dir: Path | None = None


def lr_schedule(settings: TrainSettings, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up from warmup_lr, then cosine from lr to min_lr (LAVIS linear_warmup_cosine_lr,
    with the cosine over steps instead of epochs), as a factor of lr."""

    def factor(step: int) -> float:
        if settings.warmup_steps and step < settings.warmup_steps:
            return (settings.warmup_lr + (settings.lr - settings.warmup_lr) * step / settings.warmup_steps) / settings.lr
        progress = (step - settings.warmup_steps) / max(1, total_steps - settings.warmup_steps)
        lr = settings.min_lr + (settings.lr - settings.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return lr / settings.lr

    return factor


def train(
    model: MedCapModel,
    tokenizers: Tokenizers,
    records: Sequence[CaptionRecord],
    settings: TrainSettings,
    out_dir: Path,
    provenance: checkpoint.Provenance,
    *,
    resume: bool = False,
    progress: bool = True,
    transform: ImageTransform | None = None,
) -> TrainResult:
    if not records:
        raise ValueError("no training records")
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    device = next(model.branches.parameters()).device
    branches: list[str] = [settings.branch] if settings.stage == "stage1" and settings.branch else list(model.branches)
    features = encode_images(
        model,
        records,
        transform or image_transform_for(model, training=True),
        branches,
        settings.feature_batch_size,
        progress,
        cache_dir=out_dir.with_name(out_dir.name + ".features") if settings.feature_cache == "disk" else None,
    )
    captions = [r.caption for r in records]

    params = model.trainable_parameters(settings.stage, settings.branch)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(decay_groups(params, settings.weight_decay), lr=settings.lr)
    steps_per_epoch = math.ceil(len(records) / settings.batch_size)
    total = settings.max_steps or settings.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(settings, total))
    step, losses = 0, []
    state_path = out_dir / STATE
    if resume:
        state = restore_state(state_path, asdict(settings), optimizer, scheduler)
        step, losses = state["step"], state["losses"]

    model.train()
    generator = torch.Generator().manual_seed(settings.seed)
    bar = tqdm(
        total=total,
        initial=step,
        desc=f"{settings.stage}{'/' + settings.branch if settings.branch else ''}",
        unit="step",
        disable=not progress,
    )
    try:
        step = _loop(
            model,
            tokenizers,
            settings,
            features,
            captions,
            branches,
            params,
            optimizer,
            scheduler,
            generator,
            bar,
            step,
            total,
            steps_per_epoch,
            losses,
            device,
            out_dir,
            provenance,
        )
    except KeyboardInterrupt:
        # Ctrl-C (or SIGINT from a scheduler): keep what was learnt, resumable with --resume.
        bar.close()
        _save(model, tokenizers, out_dir, provenance, settings, optimizer, scheduler, len(losses), losses, final=False)
        raise
    bar.close()
    model.eval()
    _save(model, tokenizers, out_dir, provenance, settings, optimizer, scheduler, step, losses, final=True)
    return TrainResult(step, losses, out_dir)


def _loop(
    model: MedCapModel,
    tokenizers: Tokenizers,
    settings: TrainSettings,
    features: Features,
    captions: list[str],
    branches: list[str],
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    bar: Any,
    step: int,
    total: int,
    steps_per_epoch: int,
    losses: list[dict[str, float]],
    device: torch.device,
    out_dir: Path,
    provenance: checkpoint.Provenance,
) -> int:
    count = len(captions)
    while step < total:
        epoch = step // steps_per_epoch
        order = torch.randperm(count, generator=torch.Generator().manual_seed(settings.seed * 1000 + epoch)).tolist()
        for start in range((step % steps_per_epoch) * settings.batch_size, len(order), settings.batch_size):
            if step >= total:
                break
            index = order[start : start + settings.batch_size]
            if settings.stage == "stage1" and len(index) < 2:
                continue
            tokens = {b: features.batch(b, index, device) for b in branches}
            batch_captions = [captions[i] for i in index]
            if settings.stage == "stage1":
                text = tokenizers.qformer_batch(batch_captions, model.config.max_text_tokens)
                branch = branches[0]  # stage 1 trains the one branch of settings.branch
                trained: Any = model.branches[branch]
                parts = stage1_losses(
                    trained,
                    tokens[branch],
                    text["input_ids"].to(device),
                    text["attention_mask"].to(device),
                    tokenizers.qformer_bos_id,
                    generator,
                )
                loss = parts["loss"]
                logged = {k: float(v.detach()) for k, v in parts.items()}
            else:
                batch = {
                    k: v.to(device)
                    for k, v in tokenizers.lm_batch(
                        batch_captions, model.config.prompt, model.config.eos_text, model.config.max_text_tokens
                    ).items()
                }
                loss = model(pixels={}, image_tokens=tokens, **batch)
                logged = {"loss": float(loss.detach())}
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {float(loss)} at step {step}: lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(logged | {"step": step})
            bar.update(1)
            bar.set_postfix(loss=f"{logged['loss']:.3f}")
            if settings.checkpoint_every and step % settings.checkpoint_every == 0 and step < total:
                _save(model, tokenizers, out_dir, provenance, settings, optimizer, scheduler, step, losses, final=False)
    return step


def _save(
    model: MedCapModel,
    tokenizers: Tokenizers,
    out_dir: Path,
    provenance: checkpoint.Provenance,
    settings: TrainSettings,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    losses: list[dict[str, float]],
    final: bool,
) -> None:
    """Write checkpoint and state to a sibling folder, then swap it in: an interrupted save never
    leaves a half-written checkpoint behind."""
    record = checkpoint.Provenance(provenance.sources, provenance.initialised, list(provenance.history))
    record.history.append(
        {
            "stage": settings.stage,
            "branch": settings.branch,
            "steps": step,
            "final": final,
            "last_loss": losses[-1]["loss"] if losses else None,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    tmp = out_dir.with_name(out_dir.name + ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.save(model, tokenizers, tmp, record)
    torch.save(
        {
            "settings": asdict(settings),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "losses": losses,
            "torch_rng": torch.get_rng_state(),
        },
        tmp / STATE,
    )
    checkpoint.swap_in(tmp, out_dir)


def pretrain_language_model(
    model: MedCapModel,
    tokenizers: Tokenizers,
    texts: Sequence[str],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    max_context: int = 16,
    progress: bool = True,
) -> list[float]:
    """Text-only LM training for tiny from-scratch models, standing in for OPT's pretraining.

    MSMedCap keeps a *pretrained* LM frozen and steers it with a soft prompt placed before BOS.
    A large LM reads whatever context precedes the text; a tiny one trained only on captions
    learns to ignore anything before BOS, so no soft prompt can steer it. So the tiny LM also
    learns to read a context (see :func:`pretrain_causal_lm`). No image is involved; the LM is
    frozen again afterwards, as in the real recipe.
    """
    pad = int(tokenizers.lm.pad_token_id)
    encoded = [tokenizers.lm_batch([t], "", model.config.eos_text, model.config.max_text_tokens)["input_ids"][0].tolist() for t in texts]
    bodies = [[i for i in ids[1:] if i != pad] for ids in encoded]  # without OPT's BOS, added back after the context
    return pretrain_causal_lm(
        model.lm,
        bodies,
        pad=pad,
        bos=int(tokenizers.lm.bos_token_id),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        max_context=max_context,
        progress=progress,
    )
