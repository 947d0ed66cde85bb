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

from models.msmedcap.model import FAMILY, MedCapModel

__all__ = ["FAMILY", "MedCapModel"]
