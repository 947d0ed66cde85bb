"""Memory of the full-size MSMedCap on the host: compose, save, export, load, against transformers' own loader.

Usage::

    .venv/bin/python benchmarks/model_memory.py [--size full|tiny] [--work DIR] [--keep] [--out FILE.md]

Nothing is downloaded: full-size parts are written here first, with random weights, from the
real configurations (EVA ViT-g/14 + BLIP-2 Q-Former + OPT-2.7B as ``Salesforce/blip2-opt-2.7b``
stores them, in fp32; SAM ViT-B; BERT-base), tensor by tensor, so making them costs no memory.
Each measured step then runs in a fresh process; its peak resident memory (``ru_maxrss``) is
reported, with the process's resident memory after ``import torch, transformers`` alone (the
floor every step pays) beside it:

1. compose -> a training checkpoint (frozen parts as the source stores them: fp32)
2. compose --frozen-dtype bf16 -> a training checkpoint with bf16 frozen parts
3. export -> the inference checkpoint (bf16 frozen parts, no Q-Former text side, 2 GiB shards)
4. load the inference checkpoint for inference (bf16, as for a GPU; placed on the CPU here)
5. load the training checkpoint (fp32, as CPU inference and CPU training do)
6. peer, side by side: transformers' ``Blip2ForConditionalGeneration.from_pretrained`` of the
   BLIP-2 part in bf16 (the same EVA ViT, Q-Former and OPT, without SAM or the second Q-Former)

A load is measured after reading every weight once (as placing it on a GPU does): safetensors
maps its files, so a loader that stops there has read nothing yet.

Ratios: each load's peak over the size of what it loads, MedCap's and the peer's. Goals: the
inference load peaks at <= 1.3x the bf16 checkpoint size; composing fits a 32 GB host.
``--size tiny`` runs the same steps on tiny configurations in seconds (the test of this script).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GIB = 1024**3
GOAL_LOAD_RATIO = 1.3
GOAL_COMPOSE_GB = 32


# -- full-size parts with random weights ---------------------------------------------------------


def configs(size: str) -> dict[str, Any]:
    """transformers configs of the parts: the real ones, or tiny ones of the same shape."""
    from transformers import BertConfig, Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig, SamConfig, SamVisionConfig

    if size == "full":
        # Salesforce/blip2-opt-2.7b: EVA ViT-g/14 (Blip2VisionConfig's defaults), the BERT-base
        # Q-Former, OPT-2.7B with the vocabulary resized for <image> (50304), eos "\n".
        opt = OPTConfig(
            vocab_size=50304,
            hidden_size=2560,
            num_hidden_layers=32,
            ffn_dim=10240,
            num_attention_heads=32,
            max_position_embeddings=2048,
            word_embed_proj_dim=2560,
            eos_token_id=50118,
        )
        blip2 = Blip2Config(
            vision_config=Blip2VisionConfig().to_dict(),
            qformer_config=Blip2QFormerConfig().to_dict(),
            text_config=opt.to_dict(),
            num_query_tokens=32,
        )
        return {"blip2": blip2, "sam": SamConfig(vision_config=SamVisionConfig().to_dict()), "bert": BertConfig()}
    vision = Blip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14
    )
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    opt = OPTConfig(
        vocab_size=512,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=2,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
    )
    sam = SamVisionConfig(
        hidden_size=32,
        output_channels=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=64,
        patch_size=16,
        window_size=2,
        global_attn_indexes=[1],
        num_pos_feats=8,
        mlp_dim=64,
    )
    return {
        "blip2": Blip2Config(
            vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=opt.to_dict(), num_query_tokens=4
        ),
        "sam": SamConfig(vision_config=sam.to_dict()),
        "bert": BertConfig(vocab_size=600, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    }


def write_random(model_class: Any, config: Any, directory: Path, dtype: Any, shard_gb: float = 5.0) -> int:
    """Save ``model_class(config)`` as save_pretrained lays it out, with N(0, 0.02) weights, one tensor at a time."""
    import torch

    from models import weights

    with weights.empty_weights():
        model = model_class(config)
    generator = torch.Generator().manual_seed(0)

    def make(shape: tuple[int, ...], is_float: bool, d: Any = dtype) -> Any:
        if not is_float:
            return torch.zeros(shape, dtype=torch.long)
        return (torch.randn(shape, generator=generator) * 0.02).to(d)

    tied = {name for group in weights.tied_groups(model) for name in group[1:]}
    entries = []
    for name, tensor in model.state_dict().items():
        if name in tied:
            continue
        is_float = tensor.is_floating_point()
        out = dtype if is_float else torch.long
        entries.append(
            (name, tensor.numel() * torch.empty((), dtype=out).element_size(), lambda s=tuple(tensor.shape), f=is_float: make(s, f))
        )
    files = weights.write_shards(entries, directory, int(shard_gb * GIB))
    config.save_pretrained(directory)
    return sum(f.stat().st_size for f in files)


def write_tokenizers(work: Path, bert_vocab: int) -> None:
    """An OPT-layout BPE in the BLIP-2 folder, a WordPiece of BERT's vocabulary size in the BERT folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from models.msmedcap.tokenizers import build_small_tokenizers

    build_small_tokenizers(["axial ct of the head no focal lesion"] * 4, lm_vocab=300, qformer_vocab=100).lm.save_pretrained(work / "blip2")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(bert_vocab - 5)])}
    wp = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    PreTrainedTokenizerFast(
        tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    ).save_pretrained(work / "bert")


def make_parts(work: Path, size: str) -> dict[str, int]:
    import torch
    from transformers import BertForPreTraining, Blip2ForConditionalGeneration, SamModel

    parts = configs(size)
    sizes = {
        "blip2": write_random(Blip2ForConditionalGeneration, parts["blip2"], work / "blip2", torch.float32),
        "sam": write_random(SamModel, parts["sam"], work / "sam", torch.float32),
        "bert": write_random(BertForPreTraining, parts["bert"], work / "bert", torch.float32),
    }
    write_tokenizers(work, parts["bert"].vocab_size)
    return sizes


# -- the measured steps (each in its own process) ----------------------------------------------------


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run_step(step: str, work: Path) -> dict[str, Any]:
    import torch
    import transformers  # noqa: F401  # the floor: what every step pays before it does anything

    torch.set_num_threads(1)
    floor = _rss_now()
    start = time.perf_counter()
    result: dict[str, Any] = {}
    if step in ("compose", "compose_bf16"):
        from models.msmedcap.compose import compose

        out = work / ("train" if step == "compose" else "train-bf16")
        compose(
            blip2=str(work / "blip2"),
            sam=str(work / "sam"),
            bert=str(work / "bert"),
            out=out,
            frozen_dtype=torch.bfloat16 if step == "compose_bf16" else None,
            log=lambda _: None,
        )
        result["bytes"] = _weights_bytes(out)
    elif step == "export":
        from models.msmedcap.inference import export

        export(work / "train", work / "inference", log=lambda _: None)
        result["bytes"] = _weights_bytes(work / "inference")
    elif step in ("load_inference", "load_training"):
        from models import checkpoint

        directory = work / ("inference" if step == "load_inference" else "train")
        model, _, _ = checkpoint.load(directory, "cpu", torch.bfloat16 if step == "load_inference" else None)
        result["bytes"] = _weights_bytes(directory)
        result["parameters"] = sum(p.numel() for p in model.parameters())
        result["checksum"] = _touch(model)
    elif step == "peer_load":
        from transformers import Blip2ForConditionalGeneration

        model = Blip2ForConditionalGeneration.from_pretrained(work / "blip2", dtype=torch.bfloat16)
        result["bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())  # the bf16 model it builds
        result["parameters"] = sum(p.numel() for p in model.parameters())
        result["checksum"] = _touch(model)
    else:
        raise SystemExit(f"unknown step {step}")
    result |= {
        "seconds": time.perf_counter() - start,
        "floor_rss": floor,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    return result


def _touch(model: Any) -> float:
    """Read every weight once, as moving it to a GPU or a first forward pass would: a loader that maps
    its files (safetensors does) has read nothing until then, and its peak would say nothing."""
    import torch

    return float(sum(float(p.sum(dtype=torch.float32)) for p in model.parameters()))


def _weights_bytes(directory: Path) -> int:
    from models.weights import weight_files

    return sum(f.stat().st_size for f in weight_files(directory))


STEPS = [
    ("compose", "compose -> training checkpoint (frozen parts fp32, as the source)"),
    ("compose_bf16", "compose --frozen-dtype bf16 -> training checkpoint"),
    ("export", "export -> inference checkpoint (bf16, no text side)"),
    ("load_inference", "load the inference checkpoint (bf16)"),
    ("load_training", "load the training checkpoint (fp32)"),
    ("peer_load", "peer: transformers from_pretrained, BLIP-2 part, bf16"),
]


def _gb(n: float) -> str:
    return f"{n / GIB:.2f}"


def report(results: dict[str, dict[str, Any]], sources: dict[str, int], size: str) -> tuple[str, dict[str, bool]]:
    lines = [
        f"MSMedCap host memory, size `{size}`, {platform.machine()} {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB RAM; torch 1 thread",
        "",
        f"Sources (random weights, fp32): BLIP-2 {_gb(sources['blip2'])} GiB, SAM {_gb(sources['sam'])} GiB, BERT {_gb(sources['bert'])} GiB.",
        "",
        "| step | peak RSS (GiB) | floor after imports (GiB) | weights written or read (GiB) | peak / weights | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in STEPS:
        r = results[key]
        ratio = f"{r['peak_rss'] / r['bytes']:.2f}" if r.get("bytes") else "-"
        lines.append(f"| {label} | {_gb(r['peak_rss'])} | {_gb(r['floor_rss'])} | {_gb(r['bytes'])} | {ratio} | {r['seconds']:.1f} |")
    load = results["load_inference"]["peak_rss"] / results["load_inference"]["bytes"]
    peer = results["peer_load"]["peak_rss"] / results["peer_load"]["bytes"]
    compose_peak = max(results["compose"]["peak_rss"], results["export"]["peak_rss"])
    goals = {"load <= 1.3x bf16 checkpoint": load <= GOAL_LOAD_RATIO, "compose fits 32 GB": compose_peak <= GOAL_COMPOSE_GB * 1e9}
    lines += [
        "",
        f"Inference load: peak {load:.2f}x the bf16 checkpoint; transformers' loader side by side: {peer:.2f}x the bf16 model it "
        f"builds (MedCap / transformers: {load / peer:.2f}).",
        f"Compose peak {_gb(results['compose']['peak_rss'])} GiB (training checkpoint with fp32 frozen parts, the largest case).",
        "",
    ]
    lines += [f"- goal {name}: {'MET' if ok else 'NOT MET'}" for name, ok in goals.items()]
    return "\n".join(lines) + "\n", goals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument(
        "--work", type=Path, help="where the parts and checkpoints go (default: a temporary directory; full size needs ~45 GB)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--reuse", action="store_true", help="keep the parts already in --work (they take minutes to write at full size)")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:  # a child: one step, its numbers as JSON on stdout
        print(json.dumps(run_step(args.step, args.work)))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="medcap-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        print(f"writing {args.size} parts with random weights to {work} ...", file=sys.stderr)
        if args.reuse and (work / "parts.json").is_file():
            sources = json.loads((work / "parts.json").read_text())
        else:
            sources = json.loads(
                subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        f"import json,sys; sys.path.insert(0, {str(REPO)!r}); "
                        f"from benchmarks.model_memory import make_parts; from pathlib import Path; "
                        f"print(json.dumps(make_parts(Path({str(work)!r}), {args.size!r})))",
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                    env=env,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            (work / "parts.json").write_text(json.dumps(sources))
        results = {}
        for key, label in STEPS:
            print(f"{label} ...", file=sys.stderr)
            done = subprocess.run([sys.executable, __file__, "--step", key, "--work", str(work)], capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"step {key} failed (exit {done.returncode})")
            results[key] = json.loads(done.stdout.strip().splitlines()[-1])
        table, goals = report(results, sources, args.size)
        print(table)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(table)
        return 0 if args.size == "tiny" or all(goals.values()) else 3
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
