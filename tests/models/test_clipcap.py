"""ClipCap on tiny parts: config, freezing, the loss, learning a few captions, checkpoints, compose, bf16."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from dicom_io.image_views import ImageView
from models import checkpoint
from models.captions import pre_caption
from models.clip_parts import tiny_clip_vision_config
from models.clipcap import ClipCapConfig, ClipCapModel, compose_clipcap, tiny_clipcap
from models.config import ConfigError
from models.families import CaptionModel, family
from models.generation import GenerationPreset
from models.gpt2_text import IGNORE, tiny_gpt2_config
from models.sources import ComposeError
from tests.models.parts import BEAM, FIT_KEYS, GREEDY, one_thread, reproduced, save_tiny_clip, save_tiny_gpt2, train, training_set

# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def data() -> tuple[list[str], dict[str, torch.Tensor]]:
    return training_set()


@pytest.fixture(scope="module")
def trained_mlp(data):
    """ClipCap (MLP, GPT-2 fine-tuned, the paper's setting) trained on the five slices."""
    captions, pixels = data
    model, text = tiny_clipcap(captions)
    features = model.encode(pixels)
    before = model.generate_captions(features, text, GREEDY)
    losses = train(model, text, features, captions, steps=300, lr=1e-3)
    return model, text, features, before, (losses[0], losses[-1])


# -- config --------------------------------------------------------------------------------------


def _config(**overrides) -> ClipCapConfig:
    return ClipCapConfig(clip_vision=tiny_clip_vision_config(), gpt2=tiny_gpt2_config(300, 0), **overrides)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"mapper": "lstm"}, "mapper"),
        ({"prefix_length": 0}, "prefix_length"),
        ({"mapper": "transformer", "clip_length": -1}, "clip_length"),
        ({"mapper": "transformer", "mapper_heads": 3}, "mapper_heads"),
        ({"mapper_layers": 0}, "mapper_layers"),
        ({"freeze_lm": "yes"}, "freeze_lm"),
        ({"normalize_prefix": 1}, "normalize_prefix"),
        ({"max_caption_tokens": 200}, "max_caption_tokens"),
        ({"model_type": "sbg"}, "model_type"),
        ({"gpt2": {}}, "gpt2"),
        ({"clip_vision": None}, "clip_vision"),
        ({"format_version": 99}, "format_version"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    values = {"clip_vision": tiny_clip_vision_config(), "gpt2": tiny_gpt2_config(300, 0)} | overrides
    with pytest.raises(ConfigError, match=field):
        ClipCapConfig(**values)


def test_config_fills_in_the_papers_settings_per_mapper_and_round_trips():
    mlp, transformer = _config(), _config(mapper="transformer")
    assert (mlp.prefix_length, mlp.freeze_lm) == (10, False)
    assert (transformer.prefix_length, transformer.clip_length, transformer.freeze_lm) == (40, 40, True)
    assert (mlp.display_name, transformer.display_name) == ("ClipCap (MLP)", "ClipCap (Transformer)")
    assert _config(name="Mine").display_name == "Mine"
    assert mlp.views == (ImageView("clip", 64, "clip"),)
    assert all(line.startswith("- ") for line in transformer.summary()) and "frozen" in transformer.summary()[-1]
    again = ClipCapConfig.from_dict(json.loads(transformer.to_json()))
    assert again == transformer
    with pytest.raises(ConfigError, match="unknown"):
        ClipCapConfig.from_dict(json.loads(mlp.to_json()) | {"prefix": 3})


def test_family_registry_finds_clipcap():
    kind = family("clipcap")
    assert kind.config is ClipCapConfig and kind.model is ClipCapModel
    assert kind.fit_defaults["optimizer"] == "adamw" and kind.fit_defaults["grad_clip"] == 1.0 and kind.fit_defaults["lr"] == 2e-5
    assert set(kind.fit_defaults) <= FIT_KEYS


# -- structure -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mapper", ["mlp", "transformer"])
def test_clip_is_frozen_and_stays_in_eval_mode(data, mapper):
    captions, pixels = data
    model, _ = tiny_clipcap(captions, mapper=mapper)
    assert isinstance(model, CaptionModel)
    model.train()
    assert not model.clip.training and not any(p.requires_grad for p in model.clip.parameters())
    trainable = {id(p) for p in model.trainable_parameters()}
    assert not trainable & {id(p) for p in model.clip.parameters()}
    assert {id(p) for p in model.mapper.parameters()} <= trainable
    lm = {id(p) for p in model.lm.parameters()}
    if mapper == "mlp":  # GPT-2 fine-tuned
        assert lm <= trainable and model.lm.training
    else:  # GPT-2 frozen
        assert not lm & trainable and not model.lm.training and not any(p.requires_grad for p in model.lm.parameters())
    features = model.encode(pixels)
    assert features["embedding"].shape == (5, 32) and not features["embedding"].requires_grad
    assert model.prefix(features).shape == (5, model.config.prefix_length, 32)


def test_loss_is_on_caption_tokens_and_eos_only(data):
    captions, pixels = data
    model, text = tiny_clipcap(captions)
    model.eval()
    features = {k: v[:2] for k, v in model.encode(pixels).items()}
    loss = model.caption_loss(features, captions[:2], text)
    # By hand: the prefix, then each caption; the position before each target token predicts it.
    total, count = 0.0, 0
    with torch.no_grad():
        prefix = model.prefix(features)
        for i, caption in enumerate(captions[:2]):
            ids = torch.tensor([text.ids(pre_caption(caption)) + [text.eos_id]])
            embeds = torch.cat([prefix[i : i + 1], model.lm.get_input_embeddings()(ids)], dim=1)
            logits = model.lm(inputs_embeds=embeds).logits[0, prefix.shape[1] - 1 : -1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0], reduction="sum"))
            count += ids.shape[1]
    assert float(loss.detach()) == pytest.approx(total / count, rel=1e-4)
    batch = text.caption_batch(captions[:2], 64)
    assert (batch["labels"] == IGNORE).any()  # the shorter caption was padded, and that padding did not count


# -- learning ------------------------------------------------------------------------------------


def test_mlp_clipcap_learns_the_training_captions(data, trained_mlp):
    captions, _ = data
    model, text, features, before, (first, last) = trained_mlp
    assert not any(reproduced(before, captions))  # untrained: the check below can fail
    assert last < 0.1 * first
    assert all(reproduced(model.generate_captions(features, text, GREEDY), captions))
    assert all(reproduced(model.generate_captions(features, text, BEAM), captions))


def _pretrain_lm(model: ClipCapModel, text, captions: Sequence[str], steps: int = 150) -> None:
    """Stand-in for a pretrained GPT-2: a language model that has learned to condition on prefix
    embeddings (one random code per caption). Only with such an LM can a frozen-LM mapper work."""
    lm, length = model.lm, int(model.config.prefix_length)  # type: ignore[arg-type]
    codes = torch.randn(len(captions), length, lm.config.n_embd, generator=torch.Generator().manual_seed(1))
    batch = text.caption_batch(captions, 64)
    ones = torch.ones(len(captions), length, dtype=torch.long)
    for p in lm.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(lm.parameters(), lr=3e-3)
    for _ in range(steps):
        embeds = torch.cat([codes, lm.get_input_embeddings()(batch["input_ids"])], dim=1)
        labels = torch.cat([torch.full_like(ones, IGNORE), batch["labels"]], dim=1)
        loss = lm(inputs_embeds=embeds, attention_mask=torch.cat([ones, batch["attention_mask"]], dim=1), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for p in lm.parameters():
        p.requires_grad_(False)


def test_transformer_mapper_learns_against_a_frozen_gpt2(data):
    captions, pixels = data
    model, text = tiny_clipcap(captions, mapper="transformer")
    assert model.config.freeze_lm
    _pretrain_lm(model, text, captions)
    features = model.encode(pixels)
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    clip_before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    assert not all(reproduced(model.generate_captions(features, text, GREEDY), captions))
    losses = train(model, text, features, captions, steps=300, lr=3e-3)
    first, last = losses[0], losses[-1]
    assert last < 0.2 * first
    assert all(torch.equal(v, lm_before[k]) for k, v in model.lm.state_dict().items())  # only the mapper learned
    assert all(torch.equal(v, clip_before[k]) for k, v in model.clip.state_dict().items())
    assert all(reproduced(model.generate_captions(features, text, GREEDY), captions))
    assert all(reproduced(model.generate_captions(features, text, BEAM), captions))


def test_generation_is_deterministic_and_honours_the_token_limits(data, trained_mlp):
    model, text, features, _, _ = trained_mlp
    assert model.generate_captions(features, text, BEAM) == model.generate_captions(features, text, BEAM)
    short = GenerationPreset("short", num_beams=1, max_new_tokens=3, min_new_tokens=0, repetition_penalty=1.0, length_penalty=1.0)
    assert all(len(text.ids(c)) <= 3 for c in model.generate_captions(features, text, short))
    # min_new_tokens holds eos back: the no-lesion captions (8 tokens + eos) must go on.
    long = GenerationPreset("long", num_beams=1, max_new_tokens=40, min_new_tokens=14, repetition_penalty=1.0, length_penalty=1.0)
    assert all(len(text.ids(c)) >= 13 for c in model.generate_captions(features, text, long))


# -- checkpoints, compose, placement -------------------------------------------------------------


def test_checkpoint_round_trip_keeps_weights_and_captions(trained_mlp, tmp_path):
    model, text, features, _, _ = trained_mlp
    sha = checkpoint.save(model, text, tmp_path / "ckpt", checkpoint.Provenance(sources=[{"part": "all", "source": "tests"}]))
    loaded, loaded_text, provenance = checkpoint.load(tmp_path / "ckpt")
    assert isinstance(loaded, ClipCapModel) and provenance["weights_sha256"] == sha
    assert loaded.config == model.config
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert loaded.lm.lm_head.weight.data_ptr() == loaded.lm.transformer.wte.weight.data_ptr()  # still tied
    for preset in (GREEDY, BEAM):
        assert loaded.generate_captions(features, loaded_text, preset) == model.generate_captions(features, text, preset)
    assert "ClipCap (MLP)" in (tmp_path / "ckpt" / "MODEL_CARD.md").read_text()


@pytest.mark.parametrize("mapper", ["mlp", "transformer"])
def test_bf16_placement_still_generates_on_cpu(trained_mlp, data, tmp_path, mapper):
    captions, pixels = data
    if mapper == "mlp":
        model, text, _, _, _ = trained_mlp
    else:
        model, text = tiny_clipcap(captions, mapper="transformer")
    checkpoint.save(model, text, tmp_path / mapper, checkpoint.Provenance())
    placed, placed_text, _ = checkpoint.load(tmp_path / mapper, "cpu", torch.bfloat16)
    assert next(placed.clip.parameters()).dtype == torch.bfloat16
    assert next(placed.mapper.parameters()).dtype == torch.float32  # trained parts stay fp32
    assert next(placed.lm.parameters()).dtype == (torch.bfloat16 if mapper == "transformer" else torch.float32)
    features = placed.encode(pixels)
    assert features["embedding"].dtype == torch.float32
    for preset in (GREEDY, BEAM):
        out = placed.generate_captions(features, placed_text, preset)
        assert len(out) == 5 and all(isinstance(c, str) for c in out)
        if mapper == "mlp":  # trained: bf16 CLIP features still give the same captions
            assert all(reproduced(out, captions))


@pytest.fixture(scope="module")
def parts(tmp_path_factory, data):
    captions, _ = data
    root = tmp_path_factory.mktemp("parts")
    return root, save_tiny_clip(root / "clip", captions), save_tiny_gpt2(root / "gpt2", captions)


@pytest.mark.parametrize("mapper", ["mlp", "transformer"])
def test_compose_loads_every_pretrained_part_exactly(parts, tmp_path, mapper, data):
    root, clip, gpt2 = parts
    out = compose_clipcap(
        tmp_path / "out",
        clip=str(root / "clip"),
        gpt2=str(root / "gpt2"),
        mapper=mapper,
        prefix_length=4,
        clip_length=4,
        log=lambda _: None,
    )
    model, text, provenance = checkpoint.load(out)
    assert model.config.mapper == mapper and model.config.freeze_lm == (mapper == "transformer")
    vision = model.clip.model.state_dict()
    for name, value in clip.state_dict().items():
        if name.startswith(("vision_model.", "visual_projection.")):
            assert torch.equal(vision[name], value), name
    lm = model.lm.state_dict()
    for name, value in gpt2.state_dict().items():
        assert torch.equal(lm[name], value), name
    assert text.ids("axial ct of the head") == _tokenizer_ids(root / "gpt2", "axial ct of the head")
    assert [s["source"] for s in provenance["sources"]] == [str(root / "clip"), str(root / "gpt2")]
    assert all(len(s["sha256"]) == 64 for s in provenance["sources"])
    assert any("mapping network" in part for part in provenance["initialised"])
    # Same image pixels, same CLIP: the composed tower embeds as the source does.
    _, pixels = data
    with torch.no_grad():
        expected = clip.get_image_features(pixel_values=pixels["clip"])
    expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
    assert torch.allclose(model.encode(pixels)["embedding"], expected, atol=1e-5)
    assert len(model.generate_captions(model.encode(pixels), text, GREEDY)) == 5


def _tokenizer_ids(directory: Path, sentence: str) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(directory)(sentence, add_special_tokens=False).input_ids)


def test_compose_fails_loudly_on_a_missing_part(parts, tmp_path):
    from safetensors.torch import load_file, save_file

    root, _, _ = parts
    with pytest.raises(ComposeError, match="--gpt2"):
        compose_clipcap(tmp_path / "out", clip=str(root / "clip"), gpt2=str(tmp_path / "nowhere"), log=lambda _: None)
    broken = tmp_path / "clip-broken"
    broken.mkdir()
    for f in (root / "clip").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(broken / "model.safetensors")
    del weights[next(k for k in weights if k.startswith("vision_model.encoder.layers.1."))]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ComposeError, match="--clip .*missing"):
        compose_clipcap(tmp_path / "out", clip=str(broken), gpt2=str(root / "gpt2"), log=lambda _: None)
    assert not (tmp_path / "out").exists()
