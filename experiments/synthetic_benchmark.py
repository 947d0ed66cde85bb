"""MSMedCap against its baselines and the other captioners of our sources, on synthetic slices.

    .venv/bin/python experiments/synthetic_benchmark.py --out docs/results/synthetic [--quick]

Generates the synthetic CT/MR benchmark (models/synthetic.py), trains every captioner from
scratch with one budget (models/recipes.py): BLIP-2, SAM-BLIP2 and MSMedCap, then ClipCap (MLP
and transformer mapper), SBG, CNN-LSTM and the CLIP-feature transformer; and scores them on the
test split side by side: COCO caption metrics plus accuracy on the detail words (presence, side,
size, density of the small lesion) and the global words (modality, region, plane). SBG is scored
with one, two and five candidate captions. Writes results.md/.json, predictions.json, run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from models.datasets import read_table  # noqa: E402
from models.evaluation import evaluate_checkpoints  # noqa: E402
from models.generation import preset  # noqa: E402
from models.recipes import TinyRecipe, train_tiny_captioner, train_tiny_family  # noqa: E402
from models.synthetic import GLOBAL_WORDS, generate_dataset  # noqa: E402

FAMILY = {"blip2": "BLIP-2 (CLIP only)", "sam_blip2": "SAM-BLIP2 (SAM only)", "msmedcap": "MSMedCap (CLIP + SAM)"}
OTHERS = {
    "clipcap_mlp": "ClipCap (MLP)",
    "clipcap_transformer": "ClipCap (Transformer)",
    "sbg": "SBG",
    "cnn_lstm": "CNN-LSTM",
    "clip_transformer": "CLIP-Transformer",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--validation", type=int, default=200, help="early stopping, for the captioners whose recipe has it")
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--stage1-steps", type=int, default=TinyRecipe.stage1_steps)
    parser.add_argument("--stage2-steps", type=int, default=TinyRecipe.stage2_steps)
    parser.add_argument("--sam-layout", default="channel", choices=["channel", "spatial"])
    parser.add_argument(
        "--models", default=",".join([*FAMILY, *OTHERS]), help="comma-separated subset of: " + ", ".join([*FAMILY, *OTHERS])
    )
    parser.add_argument("--reuse", action="store_true", help="keep checkpoints already under OUT/runs (evaluate again only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny run to check the plumbing (minutes)")
    args = parser.parse_args()
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(chosen) - set(FAMILY) - set(OTHERS)
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)}")
    recipe = replace(
        TinyRecipe(), stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps, sam_layout=args.sam_layout, seed=args.seed
    )
    if args.quick:
        args.train, args.validation, args.test = 200, 40, 40
        recipe = replace(recipe, lm_steps=50, stage1_steps=20, stage2_steps=40)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.out / "runs"
    started = time.time()
    data = generate_dataset(args.out / "data", args.train, args.validation, args.test, seed=args.seed, overwrite=True)
    records = read_table(data)
    train = [r for r in records if r.split == "train"]
    validation = [r for r in records if r.split == "validation"]
    test = [r for r in records if r.split == "test"]
    seconds: dict[str, float] = {}
    family = [m for m in FAMILY if m in chosen and not (args.reuse and (runs / m / "model.safetensors").is_file())]
    if family:
        clock = time.time()
        train_tiny_family(train, runs, recipe, model_types=family)
        seconds["blip2 family"] = round(time.time() - clock)
    for kind in (k for k in OTHERS if k in chosen):
        if args.reuse and (runs / kind / "model.safetensors").is_file():
            continue
        clock = time.time()
        print(f"training {OTHERS[kind]}", flush=True)
        train_tiny_captioner(kind, train, validation, runs / kind, recipe)
        seconds[kind] = round(time.time() - clock)
    trained_at = time.time()
    names = {**FAMILY, **OTHERS}
    report = evaluate_checkpoints(
        [runs / m for m in chosen],
        test,
        generation=preset("fast"),
        device="cpu",
        out_dir=args.out,
        detail_words="synthetic",
        names=[names[m] for m in chosen],
        candidates=(1, 2, 5),
    )
    timing = {
        "train_seconds": seconds,
        "total_train_seconds": round(trained_at - started),
        "evaluate_seconds": round(time.time() - trained_at),
    }
    (args.out / "run.json").write_text(
        json.dumps(
            {
                "recipe": recipe.__dict__,
                "train_images": len(train),
                "validation_images": len(validation),
                "test_images": len(test),
                "models": chosen,
                "global_words": GLOBAL_WORDS,
                "timing": timing,
            },
            indent=2,
        )
    )
    print(report.table())
    print(json.dumps(timing))


if __name__ == "__main__":
    main()
