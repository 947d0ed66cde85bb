"""Training both stages on the synthetic benchmark: the loss falls, captions are learnt, runs resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models import checkpoint
from models.captioner import Captioner
from models.captions import pre_caption
from models.datasets import load_image, read_table
from models.features import image_transform_for
from models.msmedcap.model import MedCapModel
from models.msmedcap.tiny import tiny_config
from models.msmedcap.tokenizers import build_small_tokenizers
from models.msmedcap.training import TrainSettings, pretrain_language_model, train
from models.synthetic import generate_dataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    records = read_table(generate_dataset(tmp_path_factory.mktemp("syn"), 120, 0, 0, size=64, seed=3))
    return records


def _model(records, model_type="msmedcap", width=32, queries=4):
    tokenizers = build_small_tokenizers([r.caption for r in records], lm_vocab=300, qformer_vocab=200)
    torch.manual_seed(0)
    config = tiny_config(
        model_type,
        lm_vocab=len(tokenizers.lm),
        qformer_vocab=len(tokenizers.qformer),
        width=width,
        image_size=32,
        sam_image_size=64,
        num_query_tokens=queries,
    )
    return MedCapModel(config), tokenizers


def test_stage1_losses_fall(synthetic, tmp_path):
    model, tokenizers = _model(synthetic)
    settings = TrainSettings(stage="stage1", branch="sam", max_steps=60, batch_size=16, lr=1e-3, min_lr=1e-4)
    result = train(model, tokenizers, synthetic, settings, tmp_path / "s1", checkpoint.Provenance(), progress=False)

    def mean(key, part):
        return np.mean([s[key] for s in part])

    assert mean("loss", result.losses[-5:]) < 0.9 * mean("loss", result.losses[:5])
    assert mean("itg", result.losses[-5:]) < 0.8 * mean("itg", result.losses[:5])
    assert {"itc", "itm", "itg"} <= set(result.losses[-1])
    assert (tmp_path / "s1" / "model.safetensors").is_file() and (tmp_path / "s1" / "training_state.pt").is_file()
    # Stage 1 touched only the SAM Q-Former branch.
    reloaded, _, provenance = checkpoint.load(tmp_path / "s1")
    assert provenance["history"][-1]["stage"] == "stage1" and provenance["history"][-1]["final"] is True
    assert torch.equal(reloaded.branches["clip"].query_tokens, model.branches["clip"].query_tokens)


def test_stage2_learns_the_captions_of_a_small_training_set(synthetic, tmp_path):
    few = synthetic[:8]
    model, tokenizers = _model(synthetic, "sam_blip2", width=64, queries=8)
    pretrain_language_model(model, tokenizers, [r.caption for r in synthetic], steps=400, max_context=8, progress=False)
    settings = TrainSettings(stage="stage2", max_steps=200, batch_size=8, lr=1e-3, min_lr=1e-4)
    result = train(model, tokenizers, few, settings, tmp_path / "s2", checkpoint.Provenance(), progress=False)
    first = np.mean([s["loss"] for s in result.losses[:10]])
    last = np.mean([s["loss"] for s in result.losses[-10:]])
    captioner = Captioner.load(tmp_path / "s2", "cpu")
    transform = image_transform_for(captioner.model)
    inputs = [transform(load_image(r.image_path, color="L")) for r in few]
    captions = captioner.caption({"sam": np.stack([i["sam"] for i in inputs])})
    exact = sum(c == pre_caption(r.caption) for c, r in zip(captions, few, strict=True))
    assert last < 0.6 * first, (first, last)
    assert exact >= 6, list(zip(captions, [r.caption for r in few], strict=True))


def test_interrupted_stage2_resumes_to_the_same_weights(synthetic, tmp_path, monkeypatch):
    settings = TrainSettings(stage="stage2", max_steps=10, batch_size=8, lr=1e-3, checkpoint_every=4)
    model, tokenizers = _model(synthetic)
    reference = train(model, tokenizers, synthetic[:40], settings, tmp_path / "ref", checkpoint.Provenance(), progress=False)

    model, tokenizers = _model(synthetic)
    calls = {"n": 0}
    forward = MedCapModel.forward

    def interrupted(self, *args, **kwargs):  # Ctrl-C during the 7th step
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MedCapModel, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(model, tokenizers, synthetic[:40], settings, tmp_path / "run", checkpoint.Provenance(), progress=False)
    monkeypatch.setattr(MedCapModel, "forward", forward)
    assert torch.load(tmp_path / "run" / "training_state.pt", weights_only=False)["step"] == 6

    resumed_model, tokenizers, _ = checkpoint.load(tmp_path / "run")
    resumed = train(
        resumed_model, tokenizers, synthetic[:40], settings, tmp_path / "run", checkpoint.Provenance(), resume=True, progress=False
    )
    assert resumed.steps == reference.steps == 10
    final, _, _ = checkpoint.load(tmp_path / "run")
    expected, _, _ = checkpoint.load(tmp_path / "ref")
    for (name, a), (_, b) in zip(final.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_resume_refuses_different_settings(synthetic, tmp_path):
    model, tokenizers = _model(synthetic)
    settings = TrainSettings(stage="stage2", max_steps=2, batch_size=8)
    train(model, tokenizers, synthetic[:16], settings, tmp_path / "run", checkpoint.Provenance(), progress=False)
    with pytest.raises(ValueError, match="settings differ"):
        train(
            model,
            tokenizers,
            synthetic[:16],
            TrainSettings(stage="stage2", max_steps=4, batch_size=8),
            tmp_path / "run",
            checkpoint.Provenance(),
            resume=True,
            progress=False,
        )


def test_settings_validate():
    with pytest.raises(ValueError, match="branch"):
        TrainSettings(stage="stage1")
    with pytest.raises(ValueError, match="at least 2"):
        TrainSettings(stage="stage1", branch="clip", batch_size=1)
    with pytest.raises(ValueError, match="stage"):
        TrainSettings(stage="stage3")


def test_image_transforms_follow_each_branch(synthetic):
    model, _ = _model(synthetic)
    arrays = image_transform_for(model)(load_image(Path(synthetic[0].image_path), color="L"))
    assert arrays["clip"].shape == (3, 32, 32) and arrays["sam"].shape == (3, 64, 64)


def test_each_distinct_image_is_encoded_once_and_can_live_on_disk(synthetic, tmp_path):
    from dataclasses import replace

    from models.features import encode_images

    model, _ = _model(synthetic)
    records = [synthetic[0], replace(synthetic[0], caption="another caption of the same image"), synthetic[1]]
    transform = image_transform_for(model)
    memory = encode_images(model, records, transform, ["sam"], 2, progress=False)
    assert memory.rows == [0, 0, 1] and memory.by_name["sam"].shape[0] == 2
    disk = encode_images(model, records, transform, ["sam"], 2, progress=False, cache_dir=tmp_path / "features")
    assert (tmp_path / "features" / "sam.npy").is_file()
    assert torch.allclose(
        disk.batch("sam", [0, 1, 2], torch.device("cpu")), memory.batch("sam", [0, 1, 2], torch.device("cpu")), atol=1e-2, rtol=1e-2
    )
    settings = TrainSettings(stage="stage2", max_steps=2, batch_size=8, feature_cache="disk")
    train(model, _model(synthetic)[1], synthetic[:16], settings, tmp_path / "run", checkpoint.Provenance(), progress=False)
    assert (tmp_path / "run.features" / "clip.npy").is_file()
