"""The captioner's commands as an operator runs them, chained: data → stage 1 → stage 2 → evaluate."""

from __future__ import annotations

import json
import os

import pytest
import torch

from models import checkpoint
from models.msmedcap.model import MedCapModel
from models.msmedcap.tiny import tiny_config
from tests.models.parts import tiny_tokenizers
from tests.processes import run


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MEDCAP_") or k.startswith("MEDCAP_TEST_")} | {"HF_HUB_OFFLINE": "1"}


def medcap(*args: str, env: dict[str, str] | None = None, threads: int | None = None) -> str:
    """Run ``medcap ARGS`` as an operator would; it must succeed. Returns stdout. ``threads``: the
    torch CPU threads it must report using (``--threads`` or MEDCAP_TORCH_THREADS, pinned)."""
    result = run(list(args), _env() | (env or {}), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    if threads is not None:
        assert f"torch uses {threads} CPU thread(s)\n" in result.stderr, result.stderr[-2000:]
    return result.stdout


@pytest.mark.processes
def test_data_train_evaluate_and_info(tmp_path):
    tokenizers = tiny_tokenizers()
    torch.manual_seed(0)
    model = MedCapModel(tiny_config("msmedcap", lm_vocab=len(tokenizers.lm), qformer_vocab=len(tokenizers.qformer)))
    checkpoint.save(model, tokenizers, tmp_path / "base", checkpoint.Provenance(sources=[{"part": "all", "source": "random"}]))
    medcap("data", "synthetic", "--out", str(tmp_path / "syn"), "--train", "24", "--validation", "0", "--test", "6", "--size", "64")
    data = str(tmp_path / "syn" / "captions.jsonl")
    out = medcap(
        "train",
        "stage1",
        "--qformer",
        "sam",
        "--model",
        str(tmp_path / "base"),
        "--data",
        f"M={data}",
        "--mix",
        "G+M",
        "--out",
        str(tmp_path / "s1"),
        "--max-steps",
        "2",
        "--batch-size",
        "8",
        "--device",
        "cpu",
    )
    assert "stage1: 2 steps" in out
    out = medcap(
        "train",
        "stage2",
        "--model",
        str(tmp_path / "s1"),
        "--data",
        data,
        "--out",
        str(tmp_path / "s2"),
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--checkpoint-every",
        "2",
        "--device",
        "cpu",
        "--threads",
        "1",
        threads=1,
    )
    assert "stage2: 3 steps" in out
    table = medcap(
        "evaluate",
        "--model",
        str(tmp_path / "s2"),
        "--data",
        data,
        "--split",
        "test",
        "--device",
        "cpu",
        "--detail-words",
        "synthetic",
        "--out",
        str(tmp_path / "eval"),
        env={"MEDCAP_TORCH_THREADS": "1"},
        threads=1,
    )
    assert "| MSMedCap |" in table and "CIDEr" in table and "Acc-presence" in table
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "MSMedCap" in json.dumps(results)
    assert len(json.loads((tmp_path / "eval" / "predictions.json").read_text())["predictions"]["MSMedCap"]) == 6
    card = medcap("model", "info", "--model", str(tmp_path / "s2"))
    assert '"stage": "stage1"' in card and '"stage": "stage2"' in card


@pytest.mark.processes
def test_stage1_mix_without_its_data_is_an_error(tmp_path):
    (tmp_path / "t.jsonl").write_text("")
    result = run(
        ["train", "stage1", "--qformer", "sam", "--model", str(tmp_path), "--data", "x.jsonl", "--out", str(tmp_path / "o")],
        _env(),
        timeout=120,
    )
    assert result.returncode == 1 and "medcap:" in result.stderr


@pytest.mark.processes
def test_another_family_through_the_same_commands(tmp_path):
    """CNN-LSTM from a local pretrained MobileNetV2: compose → train caption (early stopping) → evaluate → caption DICOM."""
    from tests.conftest import shared_data
    from tests.models.parts import save_tiny_mobilenet

    medcap("data", "synthetic", "--out", str(tmp_path / "syn"), "--train", "24", "--validation", "8", "--test", "6", "--size", "64")
    data = str(tmp_path / "syn" / "captions.jsonl")
    save_tiny_mobilenet(tmp_path / "mobilenet", {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "crop_size": {"height": 48, "width": 48}})
    refused = run(["model", "compose", "--model-type", "cnn_lstm", "--out", str(tmp_path / "x")], _env(), timeout=120)
    assert refused.returncode == 1 and "needs --mobilenet and --data" in refused.stderr
    medcap(
        "model",
        "compose",
        "--model-type",
        "cnn_lstm",
        "--mobilenet",
        str(tmp_path / "mobilenet"),
        "--data",
        data,
        "--min-word-count",
        "1",
        "--out",
        str(tmp_path / "base"),
    )
    out = medcap(
        "train",
        "caption",
        "--model",
        str(tmp_path / "base"),
        "--data",
        data,
        "--out",
        str(tmp_path / "trained"),
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        env={"MEDCAP_TORCH_THREADS": "1"},
        threads=1,
    )
    assert "CNN-LSTM: 9 steps, 3 epochs" in out and "best epoch" in out
    card = medcap("model", "info", "--model", str(tmp_path / "trained"))
    assert "MobileNetV2" in card and '"stage": "caption"' in card and '"validation_records": 8' in card
    table = medcap("evaluate", "--model", str(tmp_path / "trained"), "--model", str(tmp_path / "base"), "--data", data, "--device", "cpu")
    assert "| CNN-LSTM |" in table and "| CNN-LSTM (base) |" in table and "BLEU-4" in table
    drafted = json.loads(
        medcap(
            "caption",
            str(shared_data("ct-head-ge")),
            "--model",
            str(tmp_path / "trained"),
            "--json",
            "--device",
            "cpu",
            "--threads",
            "1",
            threads=1,
        )
    )
    assert drafted["model"]["name"] == "CNN-LSTM" and drafted["model"]["type"] == "cnn_lstm"
    assert len(drafted["series"]) == 1 and len(drafted["series"][0]["key_images"]) == 3


def test_every_registered_family_composes_through_its_own_function():
    from models import families

    flags = families.compose_flags()  # the registry is consistent: shared flags agree
    assert flags["clip"][1] == ("clipcap", "sbg", "clip_transformer") and flags["data"][0].data
    for model_type, registration in families.REGISTRY.items():
        assert families.family(model_type).compose is not None, model_type
        assert any(o.required for o in registration.compose), model_type


def test_families_sharing_a_flag_must_agree_on_it(monkeypatch):
    from models import families

    clashing = families.Registration("models.clipcap", (families.ComposeOption("clip", "CLIP", required=True, default="openai/clip"),))
    monkeypatch.setitem(families.REGISTRY, "clashing", clashing)
    with pytest.raises(ValueError, match="--clip: clashing declares it unlike clipcap, sbg, clip_transformer"):
        families.compose_flags()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model-type", "sbg"], "model compose --model-type sbg needs --clip and --gpt2 and --data"),
        (["--model-type", "blip2", "--blip2", "b", "--sam", "s"], "model compose --model-type blip2 does not read --sam"),
        (["--model-type", "sam_blip2", "--blip2", "b", "--sam", "s", "--blip2-itm", "i"], "does not read --blip2-itm"),
        (["--model-type", "clipcap", "--clip", "c", "--gpt2", "g", "--min-word-count", "2"], "does not read --min-word-count"),
    ],
)
def test_compose_checks_each_familys_flags_before_reading_anything(tmp_path, capsys, monkeypatch, argv, message):
    from service.cli import main

    for name in [k for k in os.environ if k.startswith("MEDCAP_") and not k.startswith("MEDCAP_TEST_")]:
        monkeypatch.delenv(name)
    assert main(["model", "compose", *argv, "--out", str(tmp_path / "x")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"name": "Clip", "help": "h"}, "ComposeOption.name must be a lower-case identifier"),
        ({"name": "out", "help": "h"}, "ComposeOption.name: --out is common to every family"),
        ({"name": "clip", "help": ""}, "ComposeOption.help: --clip needs a help text"),
        ({"name": "size", "help": "h", "kind": float}, "ComposeOption.kind: str or int"),
        ({"name": "captions", "help": "h", "data": True}, "ComposeOption.repeat: --captions holds caption data specs"),
    ],
)
def test_a_compose_option_names_the_bad_field(arguments, message):
    from models.families import ComposeOption

    with pytest.raises(ValueError, match=message):
        ComposeOption(**arguments)
    assert ComposeOption("blip2_itm", "h").flag == "--blip2-itm"
