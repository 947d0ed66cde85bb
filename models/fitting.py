"""Training any captioner on its caption loss: ``medcap train caption``.

One loop for every family (models/families.py): frozen image features are computed once per
image and cached, then ``trainable_parameters`` are optimised on ``caption_loss``. After every
epoch the validation loss decides early stopping (``patience`` epochs without improvement) and
the best weights are kept — restored at the end, so the checkpoint written is the best epoch's,
not the last one's (Zain et al.'s CNN-LSTM recipe; harmless for the others).

The output directory is a checkpoint after every epoch (written to a sibling and swapped in),
plus ``fit_state.pt`` for ``--resume`` at the next epoch.
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from models import checkpoint
from models.datasets import CaptionRecord
from models.families import family
from models.features import Features, encode_images, image_transform_for, view_names

STATE = "fit_state.pt"
OPTIMIZERS = ("adam", "adamw")


def decay_groups(params: Sequence[torch.nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Optimiser groups with weight decay on matrices and embeddings only: biases, norm scales and
    scalars such as a temperature are exempt (LAVIS exempts every parameter with ndim < 2)."""
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def restore_state(path: Path, settings: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any, why: str = "") -> dict[str, Any]:
    """``--resume``: the interrupted run's state file, its optimiser, schedule and RNG restored; the
    settings must be the interrupted run's."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist{why}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["settings"] != settings:
        raise ValueError("--resume: the training settings differ from the interrupted run's")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state


@dataclass
class FitSettings:
    epochs: int = 10
    max_steps: int | None = None  # stop after this many steps even mid-epoch (budgeted comparisons)
    batch_size: int = 32
    lr: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max gradient norm; None: no clipping
    patience: int | None = 2  # epochs without a better validation loss before stopping; None: never stop early
    warmup_steps: int = 0  # linear warm-up, then constant (or cosine, with min_lr)
    min_lr: float | None = None  # cosine decay from lr to min_lr over the run (LAVIS' schedule); None: constant
    seed: int = 0
    feature_batch_size: int = 16
    feature_cache: str = "memory"  # memory | disk (fp16 memory-mapped beside the output directory)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "feature_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps: must be at least 1")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: {self.optimizer!r} is not one of {OPTIMIZERS}")
        if not self.lr > 0:
            raise ValueError("lr: must be positive")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError("min_lr: must lie between 0 and lr")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("weight_decay/warmup_steps: must not be negative")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError("grad_clip: must be positive (or None for no clipping)")
        if self.patience is not None and self.patience < 1:
            raise ValueError("patience: must be at least 1 (or None for no early stopping)")
        if self.feature_cache not in ("memory", "disk"):
            raise ValueError(f"feature_cache: {self.feature_cache!r} is not memory or disk")

    @classmethod
    def for_model(cls, model_type: str, **overrides: Any) -> FitSettings:
        """The family's paper defaults, then every override that is not None."""
        known = {f.name for f in fields(cls)}
        values = dict(family(model_type).fit_defaults) | {k: v for k, v in overrides.items() if v is not None}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        return cls(**values)


@dataclass
class FitResult:
    steps: int
    epochs: int
    losses: list[dict[str, float]] = field(default_factory=list)  # per step
    validation: list[dict[str, float]] = field(default_factory=list)  # per epoch: {"epoch", "loss"}
    best_epoch: int | None = None
    stopped_early: bool = False
    out_dir: Path | None = None


def fit(
    model: Any,
    text: Any,
    records: Sequence[CaptionRecord],
    settings: FitSettings,
    out_dir: Path,
    provenance: checkpoint.Provenance,
    *,
    validation_records: Sequence[CaptionRecord] = (),
    resume: bool = False,
    progress: bool = True,
) -> FitResult:
    if not records:
        raise ValueError("no training records")
    if settings.patience is not None and not validation_records:
        raise ValueError("patience: early stopping needs validation records (give a validation split, or patience None)")
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    params = model.trainable_parameters()
    if not params:
        raise ValueError(f"{model.config.display_name}: nothing to train (every part is frozen)")
    device = params[0].device
    transform, branches = image_transform_for(model, training=True), view_names(model)
    cache = out_dir.with_name(out_dir.name + ".features") if settings.feature_cache == "disk" else None
    train_features = encode_images(
        model, records, transform, branches, settings.feature_batch_size, progress, cache_dir=cache / "train" if cache else None
    )
    valid_features = (
        encode_images(
            model,
            validation_records,
            transform,
            branches,
            settings.feature_batch_size,
            progress,
            cache_dir=cache / "validation" if cache else None,
        )
        if validation_records
        else None
    )

    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if settings.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(decay_groups(params, settings.weight_decay), lr=settings.lr)
    else:
        optimizer = torch.optim.AdamW(decay_groups(params, settings.weight_decay), lr=settings.lr)
    steps_per_epoch = math.ceil(len(records) / settings.batch_size)
    total = min(settings.max_steps or settings.epochs * steps_per_epoch, settings.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings, total))
    result = FitResult(steps=0, epochs=0, out_dir=out_dir)
    best: dict[str, Any] = {"loss": math.inf, "state": None, "bad": 0}
    if resume:
        result, best = _resume(out_dir, settings, optimizer, scheduler)
    captions = [r.caption for r in records]
    bar = tqdm(total=total, initial=result.steps, desc=f"training {model.config.display_name}", unit="step", disable=not progress)
    while result.steps < total and result.epochs < settings.epochs and not result.stopped_early:
        model.train()
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(settings.seed * 1000 + result.epochs)).tolist()
        for start in range(0, len(order), settings.batch_size):
            if result.steps >= total:
                break
            index = order[start : start + settings.batch_size]
            loss = model.caption_loss(train_features.batches(index, device), [captions[i] for i in index], text)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {float(loss)} at step {result.steps}: lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            scheduler.step()
            result.steps += 1
            result.losses.append({"step": result.steps, "loss": float(loss.detach())})
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]['loss']:.3f}")
        result.epochs += 1
        if valid_features is not None:
            valid = validation_loss(model, text, valid_features, [r.caption for r in validation_records], settings.batch_size, device)
            result.validation.append({"epoch": result.epochs, "loss": valid})
            bar.set_postfix(loss=f"{result.losses[-1]['loss']:.3f}", validation=f"{valid:.3f}")
            if valid < best["loss"]:
                best = {"loss": valid, "state": _changing_state(model, params), "bad": 0}
                result.best_epoch = result.epochs
            else:
                best["bad"] += 1
                result.stopped_early = settings.patience is not None and best["bad"] >= settings.patience
        _save(model, text, out_dir, provenance, settings, optimizer, scheduler, result, best, final=False)
    bar.close()
    if best["state"] is not None:
        model.load_state_dict(best["state"], strict=False)  # the best epoch's weights, not the last one's
    model.eval()
    _save(model, text, out_dir, provenance, settings, optimizer, scheduler, result, best, final=True)
    return result


def _schedule(settings: FitSettings, total: int) -> Any:
    """A factor of lr per step: linear warm-up, then constant or cosine down to min_lr."""

    def factor(step: int) -> float:
        if settings.warmup_steps and step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        if settings.min_lr is None:
            return 1.0
        progress = min(1.0, (step - settings.warmup_steps) / max(1, total - settings.warmup_steps))
        return (settings.min_lr + (settings.lr - settings.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / settings.lr

    return factor


@torch.no_grad()
def validation_loss(model: Any, text: Any, features: Features, captions: Sequence[str], batch_size: int, device: torch.device) -> float:
    """Mean caption loss over a split, weighted by batch size, in eval mode (no dropout, BatchNorm on its running statistics)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(captions), batch_size):
            index = list(range(start, min(start + batch_size, len(captions))))
            total += float(model.caption_loss(features.batches(index, device), [captions[i] for i in index], text)) * len(index)
            count += len(index)
    finally:
        model.train(was_training)
    return total / count


def _changing_state(model: Any, params: Sequence[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Trainable weights and every buffer (BatchNorm statistics), copied to CPU: what an epoch can change."""
    trainable = {id(p) for p in params}
    names = {n for n, p in model.named_parameters() if id(p) in trainable} | {n for n, _ in model.named_buffers()}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k in names}


def _save(
    model: Any,
    text: Any,
    out_dir: Path,
    provenance: checkpoint.Provenance,
    settings: FitSettings,
    optimizer: Any,
    scheduler: Any,
    result: FitResult,
    best: dict[str, Any],
    final: bool,
) -> None:
    """Checkpoint and state to a sibling folder, then swapped in: never a half-written checkpoint."""
    record = checkpoint.Provenance(provenance.sources, provenance.initialised, list(provenance.history))
    record.history.append(
        {
            "stage": "caption",
            "model_type": model.config.model_type,
            "steps": result.steps,
            "epochs": result.epochs,
            "best_epoch": result.best_epoch,
            "best_validation_loss": None if math.isinf(best["loss"]) else best["loss"],
            "stopped_early": result.stopped_early,
            "final": final,
            "last_loss": result.losses[-1]["loss"] if result.losses else None,
            "settings": asdict(settings),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    tmp = out_dir.with_name(out_dir.name + ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoint.save(model, text, tmp, record)
    if not final:
        torch.save(
            {
                "settings": asdict(settings),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "result": asdict(result) | {"out_dir": None},
                "best": best,
                "torch_rng": torch.get_rng_state(),
            },
            tmp / STATE,
        )
    checkpoint.swap_in(tmp, out_dir)


def _resume(out_dir: Path, settings: FitSettings, optimizer: Any, scheduler: Any) -> tuple[FitResult, dict[str, Any]]:
    state = restore_state(out_dir / STATE, asdict(settings), optimizer, scheduler, " (the run finished, or never saved an epoch)")
    return FitResult(**(state["result"] | {"out_dir": out_dir})), state["best"]
