"""Inference checkpoints (``medcap model export``): bf16 frozen parts, no text side, shards; the same captions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from models import checkpoint, weights
from models.captioner import Captioner
from models.msmedcap.inference import export, is_text_side
from models.msmedcap.model import MedCapModel
from models.msmedcap.tiny import tiny_config
from tests.models.parts import tiny_tokenizers


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    tokenizers = tiny_tokenizers()
    torch.manual_seed(0)
    model = MedCapModel(tiny_config("msmedcap", lm_vocab=len(tokenizers.lm), qformer_vocab=len(tokenizers.qformer)))
    checkpoint.save(model, tokenizers, root / "train", checkpoint.Provenance(sources=[{"part": "all", "source": "test"}]))
    return root / "train"


def _stored(directory):
    out = {}
    for file in weights.weight_files(directory):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_slice(k).get_dtype() for k in f.keys()})  # noqa: SIM118
    return out


def test_export_drops_the_text_side_and_halves_the_frozen_parts(trained, tmp_path):
    export(trained, tmp_path / "inf", shard_bytes=200_000, log=lambda _: None)
    stored = _stored(tmp_path / "inf")
    assert len(weights.weight_files(tmp_path / "inf")) > 1 and (tmp_path / "inf" / weights.INDEX).is_file()  # sharded
    assert not [k for k in stored if is_text_side(k)]
    assert {stored[k] for k in stored if k.startswith(("lm.", "encoders."))} == {"BF16"}
    assert {stored[k] for k in stored if k.startswith("branches.")} == {"F32"}
    source = _stored(trained)
    assert any(is_text_side(k) for k in source) and set(stored) == {k for k in source if not is_text_side(k)}
    card = (tmp_path / "inf" / "MODEL_CARD.md").read_text()
    assert "left out (an inference checkpoint)" in card and '"export": "inference"' in card
    history = json.loads((tmp_path / "inf" / "provenance.json").read_text())["history"][-1]
    assert history["text_side_weights_dropped"] == len(source) - len(stored)


def test_the_inference_checkpoint_captions_as_the_training_one_in_bf16(trained, tmp_path):
    export(trained, tmp_path / "inf", log=lambda _: None)
    gen = np.random.default_rng(0)
    inputs = {"clip": gen.standard_normal((3, 3, 64, 64)).astype(np.float32), "sam": gen.standard_normal((3, 3, 64, 64)).astype(np.float32)}
    full = Captioner.load(trained, "cpu", torch.bfloat16)
    lean = Captioner.load(tmp_path / "inf", "cpu", torch.bfloat16)
    assert lean.model.config.qformer_text is False and not hasattr(lean.model.branches["sam"], "embeddings")
    assert lean.caption(inputs, "fast") == full.caption(inputs, "fast")
    for (name, a), b in zip(lean.model.state_dict().items(), [full.model.state_dict()[n] for n in lean.model.state_dict()], strict=True):
        assert torch.equal(a, b), name


def test_stage1_refuses_an_inference_checkpoint(trained, tmp_path):
    export(trained, tmp_path / "inf", log=lambda _: None)
    model, _, _ = checkpoint.load(tmp_path / "inf")
    with pytest.raises(ValueError, match="inference checkpoint"):
        model.trainable_parameters("stage1", "sam")
    assert model.trainable_parameters("stage2")  # stage 2 still trains its query paths


def test_export_refuses_other_families(tmp_path):
    from models.cnn_lstm import tiny_cnn_lstm

    model, vocab = tiny_cnn_lstm(["a b c"] * 3, image_size=32, width=16)
    checkpoint.save(model, vocab, tmp_path / "lstm", checkpoint.Provenance())
    with pytest.raises(checkpoint.CheckpointError, match="cnn_lstm checkpoint"):
        export(tmp_path / "lstm", tmp_path / "out", log=lambda _: None)
