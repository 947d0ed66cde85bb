"""The demo model: a tiny MSMedCap trained on synthetic slices, so a fresh machine can run the
whole pipeline without downloading weights. Its drafts describe synthetic images; it is for
trying MedCap, never for reading real studies."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from models.datasets import read_table
from models.recipes import TinyRecipe, train_tiny_family
from models.synthetic import generate_dataset


def build_demo_model(out: Path, *, steps: int = 600, seed: int = 0, train_images: int = 1000, progress: bool = True) -> Path:
    with tempfile.TemporaryDirectory(prefix="medcap-demo-") as tmp:
        work = Path(tmp)
        records = [r for r in read_table(generate_dataset(work / "data", train_images, 0, 0, seed=seed)) if r.split == "train"]
        recipe = TinyRecipe(stage1_steps=max(1, steps // 2), stage2_steps=steps, lm_steps=max(1, steps // 2), seed=seed)
        trained = train_tiny_family(records, work / "runs", recipe, model_types=("msmedcap",), progress=progress)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(trained["msmedcap"], out)
    return out
