"""Lesion findings per model from a synthetic benchmark run's predictions, paired against a reference model.

    .venv/bin/python experiments/lesion_analysis.py RUN_DIR [RUN_DIR ...] [--against "MSMedCap (CLIP + SAM)"]

RUN_DIR holds a predictions.json written by experiments/synthetic_benchmark.py (or `medcap evaluate
--out`); the ground truth is read back from each image's reference caption.
Per model: lesions reported on the test images that have one, false alarms on those that have
none, the side right, the whole finding right (presence, side, size, density); and, paired per
image, how often the model is right about presence where the reference model is wrong and the
reverse, with the exact two-sided McNemar p-value. Several runs (seeds) are printed one after another.
"""

from __future__ import annotations

import argparse
import json
from math import comb
from pathlib import Path

from models.synthetic import parse_caption


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(0, min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def analyse(run: Path, against: str) -> str:
    doc = json.loads((run / "predictions.json").read_text())
    truth = {k: parse_caption(refs[0]) for k, refs in doc["references"].items()}  # the generator's captions state every attribute
    with_lesion = [k for k, a in truth.items() if a["lesion"]]
    clean = [k for k, a in truth.items() if not a["lesion"]]
    parsed = {m: {k: parse_caption(v) for k, v in preds.items()} for m, preds in doc["predictions"].items()}

    def presence_right(model: str, key: str) -> bool:
        return parsed[model][key]["lesion"] == truth[key]["lesion"]

    lines = [
        f"## {run}",
        "",
        f"| Model | lesions reported (of {len(with_lesion)}) | false alarms (of {len(clean)} clean) | side right | "
        f"finding fully right | presence: right where {against} is wrong / the reverse | McNemar p |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, by_image in parsed.items():
        reported = sum(by_image[k]["lesion"] is True for k in with_lesion)
        alarms = sum(by_image[k]["lesion"] is True for k in clean)
        side = sum(by_image[k]["lesion"] is True and by_image[k]["side"] == truth[k]["side"] for k in with_lesion)
        full = sum(
            by_image[k]["lesion"] is True and all(by_image[k][f] == truth[k][f] for f in ("side", "size", "density")) for k in with_lesion
        )
        if model == against or against not in parsed:
            paired = "—"
            p = "—"
        else:
            b = sum(presence_right(model, k) and not presence_right(against, k) for k in truth)
            c = sum(presence_right(against, k) and not presence_right(model, k) for k in truth)
            paired, p = f"{b} / {c}", f"{mcnemar_exact(b, c):.2f}"
        lines.append(f"| {model} | {reported} ({reported / len(with_lesion):.0%}) | {alarms} | {side} | {full} | {paired} | {p} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--against", default="MSMedCap (CLIP + SAM)")
    args = parser.parse_args()
    print("\n\n".join(analyse(run, args.against) for run in args.runs))


if __name__ == "__main__":
    main()
