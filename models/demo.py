"""The demo model: a tiny MSMedCap trained on synthetic slices, so a fresh machine can run the
whole pipeline without downloading weights. Its drafts describe synthetic images; it is for
trying MedCap, never for reading real studies: its name (the SR's device and algorithm name) says
so, the caption workers put :data:`DEMO_NOTICE` into its SRs' text, and the review page shows a banner."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import TextIO

#: The demo model's display name (config ``name``): the SR's device observer and algorithm name. At most 64 characters (LO).
DEMO_MODEL_NAME = "MedCap demo model - not for clinical use"
#: What the demo model's draft SRs say in their text, before the impression.
DEMO_NOTICE = "Made by the MedCap demo model (trained on synthetic images, for trying MedCap only): not for reading studies."


def is_demo(model_name: str) -> bool:
    """Whether a model (by the name its drafts record) is the demo model."""
    return model_name == DEMO_MODEL_NAME


DATA_STAGE = "synthetic training slices"


def build_demo_model(
    out: Path, *, steps: int = 600, seed: int = 0, train_images: int = 1000, progress: bool = True, stages: TextIO | None = None
) -> Path:
    """Train the demo model into ``out``. With ``progress``, each stage's bar and one line per stage
    (``stage 3/5 ..., ETA mm:ss``) on ``stages`` (default stderr) say how far the whole run is."""
    from models.datasets import read_table  # torch: imported here, so that reading the names above costs nothing
    from models.families import read_config
    from models.progress import Stage, StageProgress
    from models.recipes import TinyRecipe, tiny_family_stages, train_tiny_family
    from models.synthetic import generate_dataset

    recipe = TinyRecipe(stage1_steps=max(1, steps // 2), stage2_steps=steps, lm_steps=max(1, steps // 2), seed=seed)
    model_types = ("msmedcap",)
    overall = StageProgress([Stage(DATA_STAGE, 0), *tiny_family_stages(recipe, model_types)], out=stages, enabled=progress)
    with tempfile.TemporaryDirectory(prefix="medcap-demo-") as tmp:
        work = Path(tmp)
        overall.start(DATA_STAGE)
        records = [r for r in read_table(generate_dataset(work / "data", train_images, 0, 0, seed=seed)) if r.split == "train"]
        trained = train_tiny_family(records, work / "runs", recipe, model_types=model_types, progress=progress, on_stage=overall.start)
        overall.done()
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(trained["msmedcap"], out)
    # the name is in config.json, not in the weights: the weights hash (and DeviceUID) stay the trained model's
    config = out / "config.json"
    config.write_text(dataclasses.replace(read_config(config), name=DEMO_MODEL_NAME).to_json())
    with open(out / "MODEL_CARD.md", "a") as card:
        card.write(f"\n**{DEMO_MODEL_NAME}.** {DEMO_NOTICE}\n")
    return out
