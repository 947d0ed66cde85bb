"""Does the second encoder earn its place? BLIP-2 vs SAM-BLIP2 vs MSMedCap on synthetic slices.

    .venv/bin/python experiments/synthetic_benchmark.py --out docs/results/synthetic [--quick]

Generates the synthetic CT/MR benchmark (models/synthetic.py), trains the three tiny family
members with one recipe and budget (models/recipes.py), and scores them on the test split:
COCO caption metrics plus accuracy on the detail words (presence, side, size, density of the
small lesion) and the global words (modality, region, plane). Writes results.md/.json.
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
from models.recipes import TinyRecipe, train_tiny_family  # noqa: E402
from models.synthetic import GLOBAL_WORDS, generate_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--stage1-steps", type=int, default=TinyRecipe.stage1_steps)
    parser.add_argument("--stage2-steps", type=int, default=TinyRecipe.stage2_steps)
    parser.add_argument("--sam-layout", default="channel", choices=["channel", "spatial"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny run to check the plumbing (minutes)")
    args = parser.parse_args()
    recipe = replace(TinyRecipe(), stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps, sam_layout=args.sam_layout, seed=args.seed)
    if args.quick:
        args.train, args.test = 200, 40
        recipe = replace(recipe, lm_steps=50, stage1_steps=20, stage2_steps=40)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data = generate_dataset(args.out / "data", args.train, 0, args.test, seed=args.seed, overwrite=True)
    records = read_table(data)
    train = [r for r in records if r.split == "train"]
    test = [r for r in records if r.split == "test"]
    trained = train_tiny_family(train, args.out / "runs", recipe)
    trained_at = time.time()
    report = evaluate_checkpoints([trained[m] for m in ("blip2", "sam_blip2", "msmedcap")], test, generation=preset("fast"),
                                  device="cpu", out_dir=args.out, detail_words="synthetic",
                                  names=["BLIP-2 (CLIP only)", "SAM-BLIP2 (SAM only)", "MSMedCap (CLIP + SAM)"])  # fmt: skip
    timing = {"train_seconds": round(trained_at - started), "evaluate_seconds": round(time.time() - trained_at)}
    (args.out / "run.json").write_text(json.dumps({"recipe": recipe.__dict__, "train_images": len(train), "test_images": len(test),
                                                  "global_words": GLOBAL_WORDS, "timing": timing}, indent=2))  # fmt: skip
    print(report.table())
    print(json.dumps(timing))


if __name__ == "__main__":
    main()
