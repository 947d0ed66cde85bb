"""MSMedCap and its single-encoder baselines (BLIP-2, SAM-BLIP2): one folder, as transformers keeps one per model.

config.py      MedCapConfig: config.json of every checkpoint of the family
encoders.py    the frozen EVA-CLIP and SAM ViTs, as token sequences for the Q-Formers
qformer.py     one Q-Former branch: queries, query path, text side and stage-1 heads
model.py       MedCapModel: both branches into the frozen OPT; stage 2 and generation
stage1.py      ITC + ITM + ITG for one Q-Former
training.py    both stages: feature cache, progress, checkpoints, resume
tokenizers.py  the OPT and Q-Former (BERT) tokenizers
compose.py     a checkpoint from pretrained parts (BLIP-2, SAM, BERT)
lavis.py       a checkpoint from the authors' LAVIS .pth files
tiny.py        tiny configurations for tests, the demo and the synthetic benchmark
"""

from models.families import ComposeRequest, Family
from models.msmedcap.compose import compose
from models.msmedcap.config import MedCapConfig
from models.msmedcap.model import MedCapModel
from models.msmedcap.tokenizers import Tokenizers
from models.weights import parse_dtype

__all__ = ["FAMILY", "MedCapModel"]


def _compose(request: ComposeRequest) -> str:
    """``medcap model compose`` for msmedcap, blip2 and sam_blip2 (models/msmedcap/compose.py)."""
    o = request.options
    return compose(
        blip2=o["blip2"],
        sam=o.get("sam"),  # blip2 reads no SAM
        out=request.out,
        model_type=request.model_type,
        bert=o["bert"],
        blip2_itm=o.get("blip2_itm"),  # sam_blip2 has no CLIP Q-Former to take it
        sam_layout=o["sam_layout"],
        prompt=o["prompt"],
        name=request.name,
        eval_image_size=o["eval_image_size"],
        frozen_dtype=None if o["frozen_dtype"] == "source" else parse_dtype(o["frozen_dtype"]),
        log=request.log,
    )


FAMILY = Family(
    config=MedCapConfig,
    model=MedCapModel,
    text=Tokenizers,
    description="BLIP-2 family: frozen CLIP and/or SAM ViT, one Q-Former per encoder, frozen OPT (MSMedCap, BLIP-2, SAM-BLIP2)",
    # Stage 2 as LAVIS runs it (AdamW, cosine from 1e-4, weight decay 0.05); stage 1 has its own command.
    fit_defaults={
        "optimizer": "adamw",
        "lr": 1e-4,
        "min_lr": 1e-5,
        "weight_decay": 0.05,
        "batch_size": 8,
        "epochs": 5,
        "warmup_steps": 2000,
        "grad_clip": 1.0,
        "patience": None,
    },
    compose=_compose,
)
