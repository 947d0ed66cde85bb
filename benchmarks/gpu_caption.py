"""Captioning speed of the full-size MSMedCap and BLIP-2 on a GPU, against plain ``generate`` and against the ideal.

Usage (one H200: under 8 minutes; no network, no weights: random ones from the real configurations)::

    python3 benchmarks/gpu_caption.py [--size full|small] [--batches 1,8,32,64] [--presets fast,paper]
                                      [--models msmedcap,blip2] [--repeats 5] [--out DIR]

For each model, preset and batch size, key images (random pixels of the real views: CLIP 364 px,
SAM 1024 px) go through what a caption worker runs: the frozen encoders once per image, the
Q-Formers, then the LM. ``fast`` is greedy (MedCap's decoder: static KV cache, one CUDA graph
replay per token), ``paper`` is 15-beam search (transformers' ``generate``, as MedCap runs it).
Printed per row:

* images/s, and p50/p95 latency of one batch;
* where the time goes: the encoders, then the Q-Formers + LM (prefill and decode);
* peak GPU memory;
* ``vs generate``: the same model and inputs through plain transformers ``generate`` (DynamicCache,
  no graphs), measured in the same run (fast preset; the paper preset *is* ``generate``), and the
  share of rows whose tokens are the same as generate's (bf16 near-ties may flip a few);
* ``of ideal``: measured images/s over the ideal, from rates measured in the same run: a large
  bf16 matrix product (compute ceiling) and a device-to-device copy (bandwidth ceiling). Ideal time
  of a batch = encoder FLOPs / matmul rate + per decoded token max(LM weight and KV bytes /
  bandwidth, FLOPs / matmul rate) + the prefill likewise; FLOPs counted with torch's FlopCounterMode
  on this model at batch 1.

Goals (fast preset): >= 50 % of ideal images/s at the best batch size; >= 3x plain generate at
batch 32. ``--size small`` runs tiny configurations on the CPU in seconds: the test of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from models import weights  # noqa: E402
from models.generation import PRESETS, GenerationPreset  # noqa: E402
from models.msmedcap.config import MedCapConfig  # noqa: E402
from models.msmedcap.model import MedCapModel  # noqa: E402

OPT_EOS, OPT_PAD, OPT_BOS = 50118, 1, 2  # "\n", <pad>, </s> of OPT's vocabulary
GOAL_IDEAL, GOAL_VS_GENERATE = 0.5, 3.0


def full_config(model_type: str) -> MedCapConfig:
    """EVA ViT-g/14 + BLIP-2's Q-Former + OPT-2.7B (Salesforce/blip2-opt-2.7b) and SAM ViT-B, 364 px for captioning."""
    from transformers import Blip2QFormerConfig, Blip2VisionConfig, SamVisionConfig

    vision = {k: v for k, v in Blip2VisionConfig().to_dict().items() if k not in ("transformers_version", "model_type", "architectures")}
    sam = {k: v for k, v in SamVisionConfig().to_dict().items() if k not in ("transformers_version", "model_type", "architectures")}
    qformer = {
        k: v
        for k, v in Blip2QFormerConfig().to_dict().items()
        if k not in ("transformers_version", "model_type", "architectures", "encoder_hidden_size", "use_qformer_text_input")
    }
    lm = dict(
        vocab_size=50304,
        hidden_size=2560,
        num_hidden_layers=32,
        ffn_dim=10240,
        num_attention_heads=32,
        max_position_embeddings=2048,
        word_embed_proj_dim=2560,
        bos_token_id=OPT_BOS,
        eos_token_id=OPT_EOS,
        pad_token_id=OPT_PAD,
    )
    config = MedCapConfig(
        model_type="msmedcap",
        clip_vision=vision,
        sam_vision=sam,
        qformer=qformer | {"vocab_size": 30523},
        lm=lm,
        eval_clip_image_size=364,
        qformer_text=False,
    )
    return config.with_model_type(model_type)


def small_config(model_type: str) -> MedCapConfig:
    from models.msmedcap.tiny import tiny_config

    return tiny_config(model_type, lm_vocab=256, qformer_vocab=128, width=32, image_size=32, sam_image_size=64, qformer_text=False)


def build(config: MedCapConfig, device: torch.device, dtype: torch.dtype) -> MedCapModel:
    """The model with random N(0, 0.02) weights made on the device (frozen parts in ``dtype``, Q-Formers fp32); no host copy."""
    with weights.empty_weights():
        model = MedCapModel(config)
    generator = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for name, tensor in model.state_dict().items():
        target = dtype if name.startswith(("lm.", "encoders.")) and tensor.is_floating_point() else tensor.dtype
        if tensor.device.type == "meta":
            tensors[name] = torch.empty(tensor.shape, device=device, dtype=target).normal_(0.0, 0.02, generator=generator)
        else:
            tensors[name] = tensor.to(device)
    weights.assign(model, tensors, what="random weights")
    model.place(device, dtype)
    for parameter in model.parameters():  # inference only (and FlopCounterMode's module tracker trips on leaves that want gradients)
        parameter.requires_grad_(False)
    return model.eval()


def pixels(config: MedCapConfig, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(batch)
    return {v.name: torch.randn(batch, 3, v.size, v.size, device=device, generator=g) for v in config.views}


def eos_id(model: MedCapModel) -> int:
    """OPT's "\\n" (the small configuration's vocabulary is smaller: its last token)."""
    return min(OPT_EOS, model.lm.config.vocab_size - 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def caption_batch(model: MedCapModel, views: dict[str, torch.Tensor], preset: GenerationPreset) -> tuple[float, float, torch.Tensor]:
    """(encoder seconds, Q-Former + LM seconds, new token ids) for one batch, as a worker runs it."""
    device = views[next(iter(views))].device
    prompt = torch.full((next(iter(views.values())).shape[0], 1), OPT_BOS, dtype=torch.long, device=device)
    sync(device)
    start = time.perf_counter()
    tokens = model.image_tokens(views)
    sync(device)
    encoded = time.perf_counter()
    ids = model.generate({}, prompt, torch.ones_like(prompt), preset, eos_id(model), OPT_PAD, image_tokens=tokens)
    sync(device)
    return encoded - start, time.perf_counter() - encoded, ids


@dataclass
class Row:
    model: str
    preset: str
    batch: int
    images_per_s: float
    p50_ms: float
    p95_ms: float
    encoder_ms: float
    lm_ms: float
    peak_gib: float
    new_tokens: int
    generate_images_per_s: float | None = None
    #: Rows whose greedy tokens equal plain generate's on the same inputs (bf16 ties may flip a few).
    same_as_generate: float | None = None
    ideal_images_per_s: float | None = None

    @property
    def vs_generate(self) -> float | None:
        return self.images_per_s / self.generate_images_per_s if self.generate_images_per_s else None

    @property
    def of_ideal(self) -> float | None:
        return self.images_per_s / self.ideal_images_per_s if self.ideal_images_per_s else None


def measure(
    model: MedCapModel, name: str, preset: GenerationPreset, batch: int, repeats: int, device: torch.device, plain: bool
) -> tuple[Row, torch.Tensor]:
    views = pixels(model.config, batch, device)
    model.fast_greedy = not plain
    caption_batch(model, views, preset)  # warm-up: kernels, graph capture, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [caption_batch(model, views, preset) for _ in range(repeats)]
    model.fast_greedy = True
    latencies = [e + d for e, d, _ in runs]
    peak = torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else 0.0
    row = Row(
        name,
        preset.name,
        batch,
        batch / statistics.median(latencies),
        1000 * statistics.median(latencies),
        1000 * sorted(latencies)[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        1000 * statistics.median(e for e, _, _ in runs),
        1000 * statistics.median(d for _, d, _ in runs),
        peak,
        int(runs[-1][2].shape[1]),
    )
    return row, runs[-1][2]


# -- the ideal ----------------------------------------------------------------------------------------


def ceilings(device: torch.device) -> dict[str, float]:
    """Measured here: bf16 matrix product FLOP/s and device copy bytes/s (read + written)."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    reps = 10
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    matmul = 2 * n**3 * reps / (time.perf_counter() - start)
    size = (2 * 1024**3 if device.type == "cuda" else 256 * 1024**2) // 4
    src, dst = torch.randn(size, device=device), torch.empty(size, device=device)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    copy = 2 * size * 4 * reps / (time.perf_counter() - start)
    return {"matmul_flops": matmul, "copy_bytes": copy}


@torch.no_grad()
def flops_per_image(model: MedCapModel, preset: GenerationPreset, device: torch.device) -> dict[str, float]:
    """FLOPs of one image, counted on this model at batch 1: encoders; Q-Formers + prefill; one decode step."""
    from torch.utils.flop_counter import FlopCounterMode

    views = pixels(model.config, 1, device)
    with FlopCounterMode(display=False) as counter:
        tokens = model.image_tokens(views)
    encoders = counter.get_total_flops()
    prompt = torch.full((1, 1), OPT_BOS, dtype=torch.long, device=device)
    one = GenerationPreset("one", 1, 1, 0, 1.0, 1.0)
    model.fast_greedy = True
    with FlopCounterMode(display=False) as counter:
        model.generate({}, prompt, torch.ones_like(prompt), one, eos_id(model), OPT_PAD, image_tokens=tokens)
    prefill = counter.get_total_flops()  # Q-Formers, projections, the prefix through OPT, one logit row
    two = GenerationPreset("two", 1, 2, 0, 1.0, 1.0)
    with FlopCounterMode(display=False) as counter:
        model.generate({}, prompt, torch.ones_like(prompt), two, eos_id(model), OPT_PAD, image_tokens=tokens)
    step = counter.get_total_flops() - prefill
    return {"encoders": float(encoders), "prefill": float(prefill), "step": float(step)}


def ideal_images_per_s(
    model: MedCapModel, flops: dict[str, float], ceiling: dict[str, float], batch: int, preset: GenerationPreset, new_tokens: int
) -> float:
    """Roofline: encoders compute-bound; prefill and each decode step bound by the larger of compute and weight reads."""
    rows = batch * preset.num_beams  # generate expands the prefix per beam before the prefill
    lm_bytes = sum(p.numel() * p.element_size() for p in model.lm.parameters())
    config = model.lm.config
    prefix = model.config.num_query_tokens * len(model.config.branches) + 1
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.hidden_size * next(model.lm.parameters()).element_size()
    encoders = batch * flops["encoders"] / ceiling["matmul_flops"]
    prefill = max(rows * flops["prefill"] / ceiling["matmul_flops"], lm_bytes / ceiling["copy_bytes"])
    decode = 0.0
    for step in range(1, max(1, new_tokens)):
        kv = rows * (prefix + step) * kv_bytes_per_token
        decode += max(rows * flops["step"] / ceiling["matmul_flops"], (lm_bytes + kv) / ceiling["copy_bytes"])
    return batch / (encoders + prefill + decode)


# -- the run --------------------------------------------------------------------------------------------


def table(rows: list[Row], header: str) -> str:
    lines = [
        header,
        "",
        "| model | preset | batch | images/s | p50 ms | p95 ms | encoders ms | Q-Formers + LM ms | peak GiB | new tokens | "
        "vs generate | of ideal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        vs = (
            f"{r.vs_generate:.2f}x ({100 * (r.same_as_generate or 0):.0f} % same)"
            if r.vs_generate
            else "= generate"
            if r.preset == "paper"
            else "-"
        )
        ideal = f"{100 * r.of_ideal:.0f} %" if r.of_ideal else "-"
        lines.append(
            f"| {r.model} | {r.preset} | {r.batch} | {r.images_per_s:.1f} | {r.p50_ms:.1f} | {r.p95_ms:.1f} | {r.encoder_ms:.1f} | "
            f"{r.lm_ms:.1f} | {r.peak_gib:.1f} | {r.new_tokens} | {vs} | {ideal} |"
        )
    return "\n".join(lines) + "\n"


def goals(rows: list[Row]) -> list[str]:
    out = []
    for name in sorted({r.model for r in rows}):
        fast = [r for r in rows if r.model == name and r.preset == "fast"]
        if not fast:
            continue
        best = max(fast, key=lambda r: r.images_per_s)
        if best.of_ideal is not None:
            out.append(
                f"- {name}: best batch {best.batch}: {100 * best.of_ideal:.0f} % of ideal "
                f"(goal {100 * GOAL_IDEAL:.0f} %): {'MET' if best.of_ideal >= GOAL_IDEAL else 'NOT MET'}"
            )
        at32 = next((r.vs_generate for r in fast if r.batch == 32 and r.vs_generate), None)
        if at32 is not None:
            out.append(
                f"- {name}: batch 32: {at32:.2f}x plain generate (goal {GOAL_VS_GENERATE:.0f}x): "
                f"{'MET' if at32 >= GOAL_VS_GENERATE else 'NOT MET'}"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["full", "small"], default="full")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--presets", default="fast,paper")
    parser.add_argument("--models", default="msmedcap,blip2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new rows after this many seconds (default 420)")
    parser.add_argument("--out", type=Path, help="write gpu_caption.md and gpu_caption.json here")
    args = parser.parse_args(argv)
    device = torch.device(
        "cuda:0" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 Q-Formers, as Captioner sets on a GPU
        from models.generation import default_dtype

        dtype = default_dtype(device)
    else:
        torch.set_num_threads(min(4, os.cpu_count() or 1))
        dtype = torch.float32
    began = time.perf_counter()
    ceiling = ceilings(device)
    rows: list[Row] = []
    skipped: list[str] = []
    for name in args.models.split(","):
        config = (full_config if args.size == "full" else small_config)(name)
        model = build(config, device, dtype)
        params = sum(p.numel() for p in model.parameters())
        print(f"{config.display_name}: {params / 1e9:.2f} B parameters on {device} ({dtype})", file=sys.stderr, flush=True)
        counted: dict[str, float] | None = None
        for preset_name in args.presets.split(","):
            preset = PRESETS[preset_name]
            for batch in (int(b) for b in args.batches.split(",")):
                if time.perf_counter() - began > args.budget_s:
                    skipped.append(f"{name}/{preset_name}/{batch}")
                    continue
                row, ids = measure(model, config.display_name, preset, batch, args.repeats, device, plain=False)
                if preset.num_beams == 1:
                    plain, reference = measure(model, config.display_name, preset, batch, max(1, args.repeats // 2), device, plain=True)
                    row.generate_images_per_s = plain.images_per_s
                    width = min(ids.shape[1], reference.shape[1])
                    row.same_as_generate = float((ids[:, :width] == reference[:, :width]).all(dim=1).float().mean())
                if counted is None:
                    counted = flops_per_image(model, preset, device)
                row.ideal_images_per_s = ideal_images_per_s(model, counted, ceiling, batch, preset, row.new_tokens)
                rows.append(row)
                print(f"  {preset_name} batch {batch}: {row.images_per_s:.1f} images/s", file=sys.stderr, flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    header = (
        f"MSMedCap captioning, size `{args.size}`, {gpu}, torch {torch.__version__}, transformers "
        f"{__import__('transformers').__version__}, frozen parts {str(dtype).removeprefix('torch.')}; measured ceilings: "
        f"matmul {ceiling['matmul_flops'] / 1e12:.3g} TFLOP/s, copy {ceiling['copy_bytes'] / 1e12:.3g} TB/s; "
        f"{args.repeats} timed batches per row after a warm-up; {time.perf_counter() - began:.0f} s in all"
    )
    text = table(rows, header) + "\n" + "\n".join(goals(rows)) + "\n"
    if skipped:
        text += f"\nNot run (over the {args.budget_s:.0f} s budget): {', '.join(skipped)}\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_caption.md").write_text(text)
        (args.out / "gpu_caption.json").write_text(
            json.dumps(
                {
                    "ceilings": ceiling,
                    "rows": [asdict(r) | {"vs_generate": r.vs_generate, "of_ideal": r.of_ideal} for r in rows],
                    "skipped": skipped,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
