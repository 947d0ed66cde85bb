"""The captioner's commands as an operator runs them, chained: data → stage 1 → stage 2 → evaluate."""

from __future__ import annotations

import json
import os

import torch

from models import checkpoint
from models.msmedcap import MedCapModel
from models.tiny import tiny_config
from tests.models.parts import tiny_tokenizers
from tests.processes import run


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MEDCAP_") or k.startswith("MEDCAP_TEST_")} | {"HF_HUB_OFFLINE": "1"}


def test_data_train_evaluate_and_info(tmp_path):
    tokenizers = tiny_tokenizers()
    torch.manual_seed(0)
    model = MedCapModel(tiny_config("msmedcap", lm_vocab=len(tokenizers.lm), qformer_vocab=len(tokenizers.qformer)))
    checkpoint.save(model, tokenizers, tmp_path / "base", checkpoint.Provenance(sources=[{"part": "all", "source": "random"}]))
    env = _env()

    def medcap(*args: str) -> str:
        result = run(list(args), env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    medcap("data", "synthetic", "--out", str(tmp_path / "syn"), "--train", "24", "--validation", "0", "--test", "6", "--size", "64")
    data = str(tmp_path / "syn" / "captions.jsonl")
    out = medcap("train", "stage1", "--qformer", "sam", "--model", str(tmp_path / "base"), "--data", f"M={data}", "--mix", "G+M",
                 "--out", str(tmp_path / "s1"), "--max-steps", "2", "--batch-size", "8", "--device", "cpu")  # fmt: skip
    assert "stage1: 2 steps" in out
    out = medcap("train", "stage2", "--model", str(tmp_path / "s1"), "--data", data, "--out", str(tmp_path / "s2"), "--max-steps", "3",
                 "--batch-size", "8", "--checkpoint-every", "2", "--device", "cpu")  # fmt: skip
    assert "stage2: 3 steps" in out
    table = medcap("evaluate", "--model", str(tmp_path / "s2"), "--data", data, "--split", "test", "--device", "cpu",
                   "--detail-words", "synthetic", "--out", str(tmp_path / "eval"))  # fmt: skip
    assert "| MSMedCap |" in table and "CIDEr" in table and "Acc-presence" in table
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "MSMedCap" in json.dumps(results)
    assert len(json.loads((tmp_path / "eval" / "predictions.json").read_text())["predictions"]["MSMedCap"]) == 6
    card = medcap("model", "info", "--model", str(tmp_path / "s2"))
    assert '"stage": "stage1"' in card and '"stage": "stage2"' in card


def test_stage1_mix_without_its_data_is_an_error(tmp_path):
    (tmp_path / "t.jsonl").write_text("")
    result = run(["train", "stage1", "--qformer", "sam", "--model", str(tmp_path), "--data", "x.jsonl", "--out", str(tmp_path / "o")],
                 _env(), timeout=120)  # fmt: skip
    assert result.returncode == 1 and "medcap:" in result.stderr
