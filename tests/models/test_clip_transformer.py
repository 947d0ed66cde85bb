"""CLIP-Transformer: config, frozen CLIP, teacher forcing, learning synthetic captions, checkpoints, compose."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from dicom_io.image_views import ImageView
from models import checkpoint
from models.captions import pre_caption
from models.clip_parts import tiny_clip_vision_config
from models.clip_transformer import (
    FAMILY,
    ClipTransformerConfig,
    ClipTransformerModel,
    compose_clip_transformer,
    tiny_clip_transformer,
)
from models.config import ConfigError
from models.families import family
from models.generation import GenerationPreset
from models.sources import ComposeError
from models.word_vocab import WordVocab
from tests.models.parts import FIT_KEYS, WORD_ATTRIBUTES, presets, train, training_captions, training_set

SIZE = 64
CAPTIONS = training_captions(WORD_ATTRIBUTES)
GREEDY, BEAM = presets(30)  # whole-word tokens: fewer than GPT-2's 40


def pixels(size: int = SIZE) -> dict[str, torch.Tensor]:
    return training_set(WORD_ATTRIBUTES, size)[1]


@pytest.fixture(scope="module")
def trained() -> tuple[ClipTransformerModel, WordVocab, list[float], list[str]]:
    model, vocab = tiny_clip_transformer(CAPTIONS)
    before = model.generate_captions(model.encode(pixels()), vocab, GREEDY)
    return model, vocab, train(model, vocab, model.encode(pixels()), CAPTIONS, steps=100, lr=3e-3), before


# -- config ------------------------------------------------------------------------------------


def small_config(**overrides: object) -> ClipTransformerConfig:
    values = {"vocab_size": 20, "clip_vision": tiny_clip_vision_config(SIZE), "d_model": 32, "num_heads": 2, "ffn_dim": 64} | overrides
    return ClipTransformerConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_type", "clipcap"),
        ("vocab_size", 3),
        ("d_model", 0),
        ("num_layers", 0),
        ("num_heads", 3),
        ("num_heads", 0),
        ("ffn_dim", 0),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("max_caption_tokens", 1),
        ("min_word_count", 0),
        ("clip_vision", {}),
        ("clip_vision", {"hidden_size": 30, "num_attention_heads": 4}),
        ("format_version", 2),
    ],
)
def test_config_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        small_config(**{field: value})


def test_config_round_trips_and_describes_itself() -> None:
    config = small_config()
    assert ClipTransformerConfig.from_dict(json.loads(config.to_json())) == config
    assert config.display_name == "CLIP-Transformer" and small_config(name="CLIP-ViL").display_name == "CLIP-ViL"
    assert config.views == (ImageView("clip", SIZE, "clip"),)
    assert config.summary() and all(line.startswith("- ") for line in config.summary())
    with pytest.raises(ConfigError, match="unknown config field"):
        ClipTransformerConfig.from_dict(json.loads(config.to_json()) | {"bogus": 1})
    defaults = ClipTransformerConfig(vocab_size=20, clip_vision={"hidden_size": 64, "num_attention_heads": 2})
    assert (defaults.d_model, defaults.num_layers, defaults.num_heads, defaults.view_size) == (512, 3, 8, 224)


def test_family_registration_and_fit_defaults() -> None:
    from models.fitting import FitSettings

    assert family("clip_transformer") is FAMILY and FAMILY.text is WordVocab
    assert set(FAMILY.fit_defaults) <= FIT_KEYS
    settings = FitSettings(**FAMILY.fit_defaults)
    assert (settings.optimizer, settings.batch_size, settings.patience, settings.grad_clip) == ("adamw", 32, 2, 1.0)


# -- encoder -----------------------------------------------------------------------------------


def test_the_default_decoder_sizes() -> None:
    model = ClipTransformerModel(ClipTransformerConfig(vocab_size=10, clip_vision=tiny_clip_vision_config(SIZE)))
    layer = model.decoder.layers[0]
    assert (len(model.decoder.layers), layer.self_attn.num_heads, layer.linear1.out_features, model.head.in_features) == (3, 8, 2048, 512)
    assert model.visual[0].in_features == 32 and model.positions.num_embeddings == 52


def test_encode_gives_every_clip_token_and_the_encoder_is_frozen() -> None:
    model, vocab = tiny_clip_transformer(CAPTIONS)
    features = model.encode(pixels())
    assert features["patches"].shape == (6, 1 + 8 * 8, 32) and not features["patches"].requires_grad
    with pytest.raises(ValueError, match="clip"):
        model.encode({"sam": torch.zeros(1, 3, SIZE, SIZE)})
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable and not any(id(p) in trainable for p in model.encoder.parameters())
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    optimiser = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    model.train()
    assert not model.encoder.training and all(not m.training for m in model.encoder.modules())
    for _ in range(2):
        loss = model.caption_loss(model.encode(pixels()), CAPTIONS, vocab)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, before[key]), key


# -- training ----------------------------------------------------------------------------------


def test_it_learns_the_training_captions_greedy_and_beam(trained) -> None:
    model, vocab, losses, before = trained
    expected = [pre_caption(c) for c in CAPTIONS]
    assert before != expected  # untrained, it cannot already say them
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])
    features = model.encode(pixels())
    assert model.generate_captions(features, vocab, GREEDY) == expected
    assert model.generate_captions(features, vocab, BEAM) == expected


def test_padding_does_not_leak_into_the_loss(trained) -> None:
    model, vocab, _, _ = trained
    model = copy.deepcopy(model).eval()
    captions = [
        "axial ct of the head. no focal lesion.",
        "no focal lesion.",
        "coronal mr of the chest. large hyperintense lesion in the left lung.",
    ]
    patches = model.encode(pixels())["patches"][:3]
    with torch.no_grad():
        together = model.caption_loss({"patches": patches}, captions, vocab)
        _, lengths = vocab.encode_batch(captions)
        alone = [model.caption_loss({"patches": patches[i : i + 1]}, [c], vocab) for i, c in enumerate(captions)]
    weighted = sum(loss * (n - 1) for loss, n in zip(alone, lengths.tolist(), strict=True)) / (lengths - 1).sum()
    assert len(set(lengths.tolist())) == 3  # the batch really is padded
    torch.testing.assert_close(together, weighted)


def test_the_image_matters_and_generation_leaves_the_mode_alone(trained) -> None:
    model, vocab, _, _ = trained
    features = model.encode(pixels())
    swapped = {"patches": features["patches"].flip(0)}
    assert model.generate_captions(swapped, vocab, GREEDY) == [pre_caption(c) for c in reversed(CAPTIONS)]
    model.train()
    try:
        model.generate_captions(features, vocab, GREEDY)
        assert model.training
    finally:
        model.eval()


def test_generation_respects_the_preset_and_the_positions(trained) -> None:
    model, vocab, _, _ = trained
    features = {"patches": model.encode(pixels())["patches"][:2]}
    short = GenerationPreset("short", num_beams=2, max_new_tokens=3, min_new_tokens=0, repetition_penalty=1.0, length_penalty=1.0)
    assert [len(c.split()) for c in model.generate_captions(features, vocab, short)] == [3, 3]
    tight = copy.deepcopy(model)
    tight.config = ClipTransformerConfig.from_dict(json.loads(model.config.to_json()))
    tight.config.max_caption_tokens = 4  # only 4 positions: at most 3 new tokens, whatever the preset says
    assert all(len(c.split()) <= 3 for c in tight.generate_captions(features, vocab, GREEDY))


def test_mismatched_inputs_are_refused() -> None:
    model, vocab = tiny_clip_transformer(CAPTIONS)
    features = model.encode(pixels())
    with pytest.raises(ValueError, match="vocabulary"):
        model.generate_captions(features, WordVocab.build(["other words entirely"]), GREEDY)
    with pytest.raises(ValueError, match="captions"):
        model.caption_loss(features, CAPTIONS[:2], vocab)


# -- checkpoints -------------------------------------------------------------------------------


def test_checkpoint_round_trip_keeps_weights_and_captions(trained, tmp_path: Path) -> None:
    model, vocab, _, _ = trained
    checkpoint.save(model, vocab, tmp_path / "ckpt", checkpoint.Provenance())
    loaded, text, _ = checkpoint.load(tmp_path / "ckpt")
    assert isinstance(loaded, ClipTransformerModel) and loaded.config == model.config and text == vocab
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    features = loaded.encode(pixels())
    assert loaded.generate_captions(features, text, GREEDY) == model.generate_captions(model.encode(pixels()), vocab, GREEDY)
    assert loaded.generate_captions(features, text, BEAM) == [pre_caption(c) for c in CAPTIONS]
    assert "CLIP-Transformer" in (tmp_path / "ckpt" / "MODEL_CARD.md").read_text()


def test_bfloat16_encoder_still_generates_on_cpu(trained, tmp_path: Path) -> None:
    model, vocab, _, _ = trained
    checkpoint.save(model, vocab, tmp_path / "ckpt", checkpoint.Provenance())
    loaded, text, _ = checkpoint.load(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert next(loaded.encoder.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in loaded.trainable_parameters())
    features = loaded.encode(pixels())
    assert features["patches"].dtype == torch.bfloat16
    for preset in (GREEDY, BEAM):
        assert loaded.generate_captions(features, text, preset) == [pre_caption(c) for c in CAPTIONS]
    loaded.caption_loss(features, CAPTIONS, text).backward()


# -- compose -----------------------------------------------------------------------------------


def save_tiny_clip(directory: Path) -> CLIPModel:
    """A tiny full CLIPModel laid out as openai/clip-vit-large-patch14 is on the hub."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16)
    torch.manual_seed(4)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=24))
    clip.save_pretrained(directory)
    return clip


def test_compose_from_a_local_pretrained_clip(tmp_path: Path) -> None:
    source = save_tiny_clip(tmp_path / "clip")
    logged: list[str] = []
    captions = CAPTIONS * 2 + ["a rare word"]
    out = compose_clip_transformer(
        tmp_path / "ckpt",
        clip=str(tmp_path / "clip"),
        captions=captions,
        min_word_count=2,
        name="Test ViL",
        log=logged.append,
        d_model=16,
        num_layers=1,
        num_heads=2,
        ffn_dim=32,
    )
    assert out == tmp_path / "ckpt" and logged
    model, vocab, provenance = checkpoint.load(out)
    assert isinstance(model, ClipTransformerModel) and model.config.display_name == "Test ViL"
    assert model.config.view_size == 32 and model.config.clip_vision["projection_dim"] == 24
    assert "rare" not in vocab.stoi and vocab.min_count == model.config.min_word_count == 2
    expected = source.state_dict()
    for key, value in model.encoder.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert [s["part"] for s in provenance["sources"]] == ["CLIP ViT (vision tower)", "word vocabulary"]
    assert provenance["sources"][0]["sha256"] == checkpoint.sha256_file(tmp_path / "clip" / "model.safetensors")
    assert any("decoder" in part for part in provenance["initialised"])
    features = model.encode(pixels(32))
    assert features["patches"].shape == (6, 1 + 16, 32)
    assert len(model.generate_captions(features, vocab, BEAM)) == 6


def test_compose_refuses_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(ComposeError, match="does not exist"):
        compose_clip_transformer(tmp_path / "ckpt", clip=str(tmp_path / "nothing"), captions=CAPTIONS, log=lambda _: None)
    assert not (tmp_path / "ckpt").exists()
