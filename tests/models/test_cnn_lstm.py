"""CNN-LSTM: config, frozen MobileNet, packed training, learning synthetic captions, checkpoints, compose."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from dicom_io.image_views import ImageView, view_array
from dicom_io.transforms import clip_input
from models import checkpoint
from models.captions import pre_caption
from models.cnn_lstm import FAMILY, CnnLstmConfig, CnnLstmModel, compose_cnn_lstm, tiny_cnn_lstm, tiny_mobilenet_config
from models.config import ConfigError
from models.families import family
from models.sources import ComposeError
from models.word_vocab import PAD, WordVocab
from tests.models.parts import FIT_KEYS, WORD_ATTRIBUTES, presets, save_tiny_mobilenet, slice_images, train, training_captions, training_set

SIZE = 64
CAPTIONS = training_captions(WORD_ATTRIBUTES)
GREEDY, BEAM = presets(30)  # whole-word tokens: fewer than GPT-2's 40


def pixels() -> dict[str, torch.Tensor]:
    return training_set(WORD_ATTRIBUTES, view=ImageView("mobilenet", SIZE, "mean_std", mean=(0.5,) * 3, std=(0.5,) * 3))[1]


@pytest.fixture(scope="module")
def trained() -> tuple[CnnLstmModel, WordVocab, list[float], list[str]]:
    model, vocab = tiny_cnn_lstm(CAPTIONS)
    before = model.generate_captions(model.encode(pixels()), vocab, GREEDY)
    return model, vocab, train(model, vocab, model.encode(pixels()), CAPTIONS, steps=150, lr=1e-2), before


def encoder_state(model: CnnLstmModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.encoder.state_dict().items()}


# -- config ------------------------------------------------------------------------------------


def small_config(**overrides: object) -> CnnLstmConfig:
    return CnnLstmConfig(**({"vocab_size": 20, "mobilenet": tiny_mobilenet_config(), "image_size": SIZE} | overrides))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_type", "msmedcap"),
        ("vocab_size", 4),
        ("vocab_size", 0),
        ("image_size", 0),
        ("embed_dim", 0),
        ("hidden_dim", -1),
        ("num_layers", 0),
        ("max_caption_tokens", 1),
        ("min_word_count", 0),
        ("mobilenet", {}),
        ("mobilenet", {"depth_multiplier": 0}),
        ("pixel_mean", [0.5, 0.5]),
        ("pixel_std", [0.5, 0.0, 0.5]),
        ("pixel_std", "0.5"),
        ("format_version", 99),
    ],
)
def test_config_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        small_config(**{field: value})


def test_config_round_trips_and_describes_itself() -> None:
    config = small_config(pixel_mean=(0.4, 0.4, 0.4), name="")
    assert CnnLstmConfig.from_dict(json.loads(config.to_json())) == config
    assert config.pixel_mean == [0.4, 0.4, 0.4]
    assert config.display_name == "CNN-LSTM" and small_config(name="Zain").display_name == "Zain"
    assert config.views == (ImageView("mobilenet", SIZE, "mean_std", mean=(0.4, 0.4, 0.4), std=(0.5, 0.5, 0.5)),)
    assert config.summary() and all(line.startswith("- ") for line in config.summary())
    with pytest.raises(ConfigError, match="unknown config field"):
        CnnLstmConfig.from_dict(json.loads(config.to_json()) | {"bogus": 1})
    defaults = CnnLstmConfig(vocab_size=20, mobilenet={"depth_multiplier": 1.0})
    assert (defaults.embed_dim, defaults.hidden_dim, defaults.num_layers, defaults.image_size) == (256, 512, 1, 224)
    assert defaults.pixel_mean == defaults.pixel_std == [0.5, 0.5, 0.5] and defaults.min_word_count == 5


def test_family_registration_and_fit_defaults() -> None:
    from models.fitting import FitSettings

    assert family("cnn_lstm") is FAMILY and FAMILY.text is WordVocab
    assert set(FAMILY.fit_defaults) <= FIT_KEYS
    settings = FitSettings(**FAMILY.fit_defaults)
    assert (settings.optimizer, settings.lr, settings.batch_size, settings.patience, settings.grad_clip) == ("adam", 1e-3, 64, 2, None)


# -- encoder -----------------------------------------------------------------------------------


def test_encode_reads_its_own_view_as_the_old_clip_conversion_did() -> None:
    """The ``mobilenet`` view is what checkpoints of format 1 were fed before (the CLIP view mapped
    back to MobileNet's statistics inside ``encode``), so they caption as before; nothing in the
    checkpoint changed (the statistics were always in config.json)."""
    model, _ = tiny_cnn_lstm(CAPTIONS, pixel_mean=[0.2, 0.3, 0.4], pixel_std=[0.6, 0.5, 0.4])
    assert model.config.format_version == 1
    image = slice_images(WORD_ATTRIBUTES)[1]
    (view,) = model.config.views
    features = model.encode({"mobilenet": torch.from_numpy(view_array(view, image)[0])[None]})["pooled"]
    resized = (  # the former path: CLIP view -> [0, 1] -> MobileNet's normalisation
        torch.from_numpy(clip_input(image, SIZE)) * torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
        + torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    )
    expected = (resized - torch.tensor([0.2, 0.3, 0.4])[:, None, None]) / torch.tensor([0.6, 0.5, 0.4])[:, None, None]
    with torch.no_grad():
        former = model.encoder(pixel_values=expected[None]).pooler_output
    assert features.shape == (1, model.feature_dim) == (1, 320)
    torch.testing.assert_close(features, former, rtol=1e-4, atol=1e-5)
    assert features.std() > 1e-2  # the calibrated random MobileNet does not flatten the image away
    with pytest.raises(ValueError, match="reads the 'mobilenet' view"):
        model.encode({"clip": torch.zeros(1, 3, SIZE, SIZE)})


def test_the_paper_sizes() -> None:
    model = CnnLstmModel(CnnLstmConfig(vocab_size=10, mobilenet={"depth_multiplier": 1.0}))
    assert model.feature_dim == 1280  # MobileNetV2 1.0's pooled feature
    assert (model.embed.embedding_dim, model.lstm.hidden_size, model.lstm.num_layers) == (256, 512, 1)
    assert model.encode({"mobilenet": torch.zeros(1, 3, 224, 224)})["pooled"].shape == (1, 1280)


def test_encoder_is_frozen_and_stays_in_eval_mode_while_training() -> None:
    model, vocab = tiny_cnn_lstm(CAPTIONS)
    before = encoder_state(model)
    assert any(k.endswith("running_mean") and v.abs().sum() > 0 for k, v in before.items())  # calibrated, not defaults
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable and not any(id(p) in trainable for p in model.encoder.parameters())
    assert all(not p.requires_grad for p in model.encoder.parameters())
    optimiser = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    model.train()
    assert not model.encoder.training and all(not m.training for m in model.encoder.modules())
    assert model.image_embedding.training
    for _ in range(3):
        loss = model.caption_loss(model.encode(pixels()), CAPTIONS, vocab)  # encode inside the loop on purpose
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = encoder_state(model)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


# -- training ----------------------------------------------------------------------------------


def test_it_learns_the_training_captions_greedy_and_beam(trained) -> None:
    model, vocab, losses, before = trained
    expected = [pre_caption(c) for c in CAPTIONS]
    assert before != expected  # untrained, it cannot already say them
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])
    features = model.encode(pixels())
    assert model.generate_captions(features, vocab, GREEDY) == expected
    assert model.generate_captions(features, vocab, BEAM) == expected
    assert not model.training


def test_packed_loss_equals_a_masked_unpacked_computation(trained) -> None:
    model, vocab, _, _ = trained
    model = copy.deepcopy(model).eval()  # running BatchNorm statistics: rows do not affect each other
    captions = [
        "axial ct of the head. no focal lesion.",
        "no focal lesion.",
        "coronal mr of the chest. large hyperintense lesion in the left lung.",
    ]
    features = {"pooled": model.encode(pixels())["pooled"][:3]}
    with torch.no_grad():
        packed = model.caption_loss(features, captions, vocab)
        ids, lengths = vocab.encode_batch(captions)
        inputs = torch.cat([model.image_embedding(features["pooled"])[:, None], model.embed(ids[:, :-1])], dim=1)
        logits = model.head(model.lstm(inputs)[0])[:, 1:]
        unpacked = F.cross_entropy(logits.reshape(-1, len(vocab)), ids[:, 1:].reshape(-1), ignore_index=PAD)
        # Each caption alone, weighted by its number of targets (words and <EOS>).
        alone = [model.caption_loss({"pooled": features["pooled"][i : i + 1]}, [c], vocab) for i, c in enumerate(captions)]
        weighted = sum(loss * (n - 1) for loss, n in zip(alone, lengths.tolist(), strict=True)) / (lengths - 1).sum()
    assert lengths.tolist()[1] < lengths.tolist()[0]  # the batch really is padded
    torch.testing.assert_close(packed, unpacked)
    torch.testing.assert_close(packed, weighted)


def test_a_training_batch_of_one_uses_the_running_statistics() -> None:
    model, vocab = tiny_cnn_lstm(CAPTIONS)
    norm: Any = model.image_embedding[1]
    features = model.encode(pixels())
    model.train()
    running = norm.running_mean.clone()
    loss = model.caption_loss({"pooled": features["pooled"][:1]}, CAPTIONS[:1], vocab)
    loss.backward()
    assert torch.isfinite(loss) and torch.equal(norm.running_mean, running)
    model.caption_loss({"pooled": features["pooled"][:2]}, CAPTIONS[:2], vocab)
    assert not torch.equal(norm.running_mean, running)  # a real batch still updates them


def test_mismatched_inputs_are_refused() -> None:
    model, vocab = tiny_cnn_lstm(CAPTIONS)
    features = model.encode(pixels())
    with pytest.raises(ValueError, match="vocabulary"):
        model.caption_loss(features, CAPTIONS, WordVocab.build(["other words entirely"]))
    with pytest.raises(ValueError, match="captions"):
        model.caption_loss(features, CAPTIONS[:2], vocab)


# -- checkpoints -------------------------------------------------------------------------------


def test_checkpoint_round_trip_keeps_weights_and_captions(trained, tmp_path: Path) -> None:
    model, vocab, _, _ = trained
    checkpoint.save(model, vocab, tmp_path / "ckpt", checkpoint.Provenance())
    loaded, text, _ = checkpoint.load(tmp_path / "ckpt")
    assert isinstance(loaded, CnnLstmModel) and loaded.config == model.config and text == vocab
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:  # BatchNorm running statistics included
        assert torch.equal(original[key], restored[key]), key
    features = loaded.encode(pixels())
    assert loaded.generate_captions(features, text, GREEDY) == model.generate_captions(model.encode(pixels()), vocab, GREEDY)
    assert loaded.generate_captions(features, text, BEAM) == [pre_caption(c) for c in CAPTIONS]
    assert "CNN-LSTM" in (tmp_path / "ckpt" / "MODEL_CARD.md").read_text()


def test_bfloat16_encoder_still_generates_on_cpu(trained, tmp_path: Path) -> None:
    model, vocab, _, _ = trained
    checkpoint.save(model, vocab, tmp_path / "ckpt", checkpoint.Provenance())
    loaded, text, _ = checkpoint.load(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert next(loaded.encoder.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in loaded.trainable_parameters())
    features = loaded.encode(pixels())
    assert features["pooled"].dtype == torch.bfloat16
    for preset in (GREEDY, BEAM):
        assert loaded.generate_captions(features, text, preset) == [pre_caption(c) for c in CAPTIONS]
    loaded.caption_loss(features, CAPTIONS, text).backward()  # trains on bf16 features too


# -- compose -----------------------------------------------------------------------------------


def test_compose_from_a_local_pretrained_mobilenet(tmp_path: Path) -> None:
    preprocessor = {
        "crop_size": {"height": 40, "width": 40},
        "do_center_crop": True,
        "do_normalize": True,
        "image_mean": [0.4, 0.45, 0.5],
        "image_std": [0.3, 0.25, 0.2],
        "size": {"shortest_edge": 48},
    }
    source = save_tiny_mobilenet(tmp_path / "mobilenet", preprocessor)
    captions = CAPTIONS * 2 + ["a rare word"]
    logged: list[str] = []
    out = compose_cnn_lstm(
        tmp_path / "ckpt",
        mobilenet=str(tmp_path / "mobilenet"),
        captions=captions,
        min_word_count=2,
        name="Test CNN-LSTM",
        log=logged.append,
        embed_dim=16,
        hidden_dim=24,
    )
    assert out == tmp_path / "ckpt" and logged
    model, vocab, provenance = checkpoint.load(out)
    assert isinstance(model, CnnLstmModel) and model.config.display_name == "Test CNN-LSTM"
    assert model.config.pixel_mean == [0.4, 0.45, 0.5] and model.config.pixel_std == [0.3, 0.25, 0.2]
    assert model.config.image_size == 40 and (model.config.embed_dim, model.config.hidden_dim) == (16, 24)
    assert model.config.mobilenet["depth_multiplier"] == 0.25 and "id2label" not in model.config.mobilenet
    assert "rare" not in vocab.stoi and "lesion" in vocab.stoi and vocab.min_count == model.config.min_word_count == 2
    expected = source.state_dict()
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, expected[key]), key
    parts = [s["part"] for s in provenance["sources"]]
    assert parts == ["MobileNetV2 image encoder", "word vocabulary"]
    assert provenance["sources"][0]["sha256"] == checkpoint.sha256_file(tmp_path / "mobilenet" / "model.safetensors")
    assert any("LSTM" in part for part in provenance["initialised"])
    assert len(model.generate_captions(model.encode({"mobilenet": torch.zeros(2, 3, 40, 40)}), vocab, BEAM)) == 2


def test_compose_without_preprocessor_uses_the_google_normalisation(tmp_path: Path) -> None:
    source = save_tiny_mobilenet(tmp_path / "mobilenet", None, classifier=False)
    logged: list[str] = []
    compose_cnn_lstm(tmp_path / "ckpt", mobilenet=str(tmp_path / "mobilenet"), captions=CAPTIONS, min_word_count=1, log=logged.append)
    model = checkpoint.load(tmp_path / "ckpt")[0]
    config = model.config
    for key, value in source.state_dict().items():
        assert torch.equal(value, model.encoder.state_dict()[key]), key
    assert config.pixel_mean == config.pixel_std == [0.5, 0.5, 0.5] and config.image_size == 48
    assert any("preprocessor_config.json" in line for line in logged)


def test_compose_refuses_missing_or_wrong_sources(tmp_path: Path) -> None:
    with pytest.raises(ComposeError, match="does not exist"):
        compose_cnn_lstm(tmp_path / "ckpt", mobilenet=str(tmp_path / "nothing"), captions=CAPTIONS, log=lambda _: None)
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(
        CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1, image_size=32, patch_size=8)
    ).save_pretrained(tmp_path / "clip")
    with pytest.raises(ComposeError):
        compose_cnn_lstm(tmp_path / "ckpt", mobilenet=str(tmp_path / "clip"), captions=CAPTIONS, log=lambda _: None)
    assert not (tmp_path / "ckpt").exists()
