"""SBG on tiny parts: keywords, config, GPT-2 blind to the image, learning, reranking, checkpoints, compose, bf16."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dicom_io.image_views import ImageView
from models import checkpoint
from models.captions import pre_caption
from models.clip_parts import tiny_clip_vision_config
from models.config import ConfigError
from models.families import CaptionModel, family
from models.gpt2_text import CLIP_FOLDER, ClipTokens, tiny_clip_text_config, tiny_gpt2_config
from models.sbg import SbgConfig, SbgModel, SbgText, build_keywords, caption_keywords, compose_sbg, tiny_sbg
from models.sources import ComposeError
from tests.models.parts import BEAM, FIT_KEYS, GREEDY, one_thread, reproduced, save_tiny_clip, save_tiny_gpt2, train, training_set


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def data():
    return training_set()


@pytest.fixture(scope="module")
def trained(data):
    captions, pixels = data
    model, text = tiny_sbg(captions)
    features = model.encode(pixels)
    before = model.generate_captions(features, text, GREEDY.with_candidates(1))
    losses = train(model, text, features, captions, steps=450, lr=1e-3)
    return model, text, features, before, (losses[0], losses[-1])


# -- keywords ------------------------------------------------------------------------------------


def test_build_keywords_keeps_frequent_content_words():
    captions = ["Axial CT of the head. No focal lesion.", "axial ct of the chest, small lesion", "coronal MR of the head: no focal lesion"]
    keywords = build_keywords(captions, min_count=2)
    assert keywords == ["lesion", "axial", "ct", "focal", "head", "no"]  # by caption count, then alphabetically
    assert not {"of", "the"} & set(build_keywords(captions, min_count=1))
    assert "no" in keywords  # a negation is a finding, not a stopword
    assert build_keywords(captions, max_keywords=2, min_count=1) == ["lesion", "axial"]
    assert caption_keywords("Small lesion in the head; lesion again.", keywords) == ["lesion", "head"]
    with pytest.raises(ValueError, match="max_keywords"):
        build_keywords(captions, max_keywords=0)


# -- config --------------------------------------------------------------------------------------


def _values(**overrides):
    from models.gpt2_text import build_small_clip_tokenizer

    clip_text = tiny_clip_text_config(build_small_clip_tokenizer(["axial ct"]))
    return {
        "clip_vision": tiny_clip_vision_config(),
        "clip_text": clip_text,
        "gpt2": tiny_gpt2_config(300, 0),
        "keywords": ["ct", "head"],
    } | overrides


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"keywords": []}, "keywords"),
        ({"keywords": ["ct", "ct"]}, "keywords"),
        ({"keywords": ["ct", " "]}, "keywords"),
        ({"top_k": 0}, "top_k"),
        ({"candidates": 0}, "candidates"),
        ({"keyword_threshold": 1.5}, "keyword_threshold"),
        ({"keyword_dropout": 1.0}, "keyword_dropout"),
        ({"hard_negatives": -1}, "hard_negatives"),
        ({"contrastive_weight": -1.0}, "contrastive_weight"),
        ({"train_clip": "no"}, "train_clip"),
        ({"max_caption_tokens": 120}, "max_caption_tokens"),
        ({"model_type": "clipcap"}, "model_type"),
        ({"clip_text": {}}, "clip_text"),
        ({"clip_vision": tiny_clip_vision_config() | {"projection_dim": 16}}, "projection_dim"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        SbgConfig(**_values(**overrides))


def test_config_properties_and_json_round_trip():
    config = SbgConfig(**_values())
    assert config.display_name == "SBG" and config.views == (ImageView("clip", 64, "clip"),)
    assert all(line.startswith("- ") for line in config.summary())
    assert SbgConfig.from_dict(json.loads(config.to_json())) == config
    kind = family("sbg")
    assert kind.config is SbgConfig and kind.model is SbgModel and kind.text is SbgText
    assert kind.fit_defaults["grad_clip"] == 1.0 and set(kind.fit_defaults) <= FIT_KEYS


def test_text_codec_saves_both_tokenizers(data, tmp_path):
    captions, _ = data
    _, text = tiny_sbg(captions)
    text.save(tmp_path)
    loaded = SbgText.load(tmp_path)
    assert loaded.clip("axial ct").input_ids == text.clip("axial ct").input_ids
    assert loaded.gpt2.ids(captions[0]) == text.gpt2.ids(captions[0])
    (tmp_path / "bare").mkdir()
    text.gpt2.save(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match=CLIP_FOLDER):
        SbgText.load(tmp_path / "bare")


# -- structure -----------------------------------------------------------------------------------


@pytest.mark.parametrize("train_clip", [True, False])
def test_vision_tower_is_frozen_and_the_text_side_trains_only_with_train_clip(data, train_clip):
    captions, pixels = data
    model, _ = tiny_sbg(captions, train_clip=train_clip)
    assert isinstance(model, CaptionModel)
    model.train()
    assert not model.clip.training and not any(p.requires_grad for p in model.clip.parameters())
    trainable = {id(p) for p in model.trainable_parameters()}
    assert not trainable & {id(p) for p in model.clip.parameters()}
    assert {id(p) for p in model.lm.parameters()} <= trainable
    text_side = {id(p) for p in [*model.clip_text.parameters(), model.image_adapter.weight, model.logit_scale, model.keyword_bias]}
    assert (text_side <= trainable) if train_clip else not (text_side & trainable)
    assert model.clip_text.training == train_clip
    assert model.encode(pixels)["embedding"].shape == (5, 32)


def test_untrained_adapter_keeps_clips_own_embedding(data):
    captions, pixels = data
    model, _ = tiny_sbg(captions)
    features = model.encode(pixels)
    assert torch.allclose(model.image_embedding(features), F.normalize(features["embedding"], dim=-1), atol=1e-6)


def test_gpt2_never_sees_the_image(data):
    captions, pixels = data
    model, text = tiny_sbg(captions)
    calls: list[dict] = []
    hook = model.lm.register_forward_pre_hook(lambda _m, args, kwargs: calls.append(dict(kwargs, args=args)), with_kwargs=True)
    try:
        features = model.encode(pixels)
        model.generate_captions(features, text, BEAM.with_candidates(2))
    finally:
        hook.remove()
    assert calls and all(c.get("inputs_embeds") is None and not c["args"] for c in calls)
    first = calls[0]["input_ids"]
    assert text.gpt2.decode(first[0][first[0] != text.gpt2.pad_id]).startswith("keywords:")
    # The same keywords give the same caption, whatever the image (one candidate: no reranking).
    model.select_keywords = lambda logits: [["ct", "head"]] * logits.shape[0]
    other = {"embedding": torch.randn_like(features["embedding"])}
    preset = GREEDY.with_candidates(1)
    assert model.generate_captions(features, text, preset) == model.generate_captions(other, text, preset)
    assert len(set(model.generate_captions(features, text, preset))) == 1


def test_loss_combines_lm_infonce_and_keyword_terms(data):
    captions, pixels = data
    model, text = tiny_sbg(captions)
    model.eval()  # no keyword noise, no swapped negatives: the terms are exact
    features = model.encode(pixels)
    full = model.caption_loss(features, captions, text).detach()
    model.config.contrastive_weight = model.config.keyword_weight = 0.0
    lm_only = model.caption_loss(features, captions, text).detach()
    model.config.train_clip = False
    assert float(model.caption_loss(features, captions, text).detach()) == pytest.approx(float(lm_only))
    assert float(full) > float(lm_only) > 0


# -- learning ------------------------------------------------------------------------------------


def test_sbg_learns_keywords_captions_and_reranking(data, trained):
    captions, _ = data
    model, text, features, before, (first, last) = trained
    assert not any(reproduced(before, captions))
    assert last < 0.1 * first
    with torch.no_grad():
        chosen = model.select_keywords(model.keyword_logits(model.image_embedding(features), text))
    assert [sorted(k) for k in chosen] == [sorted(caption_keywords(c, model.config.keywords)) for c in captions]
    for preset in (GREEDY, BEAM):
        for n in (1, 2, 5):
            assert all(reproduced(model.generate_captions(features, text, preset.with_candidates(n)), captions)), (preset.num_beams, n)
    # Reranking alone: each true caption, hidden last among the other training captions, is found.
    shuffled = [[*(c for c in captions if c != true), true] for true in captions]
    assert model.rerank(features, shuffled, text) == captions
    # ... and among near misses of itself, one keyword swapped, as beam search produces them.
    near = [[_swap(true, w) for w in dict.fromkeys(pre_caption(true).split(" ")) if w in OTHER] + [pre_caption(true)] for true in captions]
    assert all(len(row) == 3 for row in near)
    assert model.rerank(features, near, text) == [pre_caption(c) for c in captions]


OTHER = {"ct": "mr", "mr": "ct", "head": "chest", "chest": "abdomen", "abdomen": "head"}


def _swap(caption: str, word: str) -> str:
    return " ".join(OTHER[w] if w == word else w for w in pre_caption(caption).split(" "))


def _clip_scores(model: SbgModel, text: SbgText, features, candidates: list[list[str]]) -> torch.Tensor:
    """CLIP's scores by hand: the adapted image embedding against each candidate's text embedding."""
    with torch.no_grad():
        image = F.normalize(model.image_adapter(features["embedding"]), dim=-1)
        tokens = ClipTokens(text.clip, model.config.clip_text_tokens)([c for row in candidates for c in row])
        texts = F.normalize(model.clip_text(**tokens), dim=-1).view(len(candidates), len(candidates[0]), -1)
        return torch.einsum("bd,bnd->bn", image, texts)


@pytest.mark.parametrize("which", ["trained", "untrained"])
def test_reranking_picks_the_candidate_clip_scores_best(data, trained, which, monkeypatch):
    captions, _ = data
    model, text, features = trained[:3] if which == "trained" else (*tiny_sbg(captions, seed=1), trained[2])
    # GPT-2's candidates, fixed: the other captions first, the image's own caption fourth.
    rows = [[captions[(i + k) % 5] for k in (1, 2, 3, 0, 4)] for i in range(5)]
    asked: list[int] = []

    def write(keywords, text_, preset, n=1):
        asked.append(n)
        return [row[:n] for row in rows]

    monkeypatch.setattr(model, "write", write)
    best = _clip_scores(model, text, features, rows).argmax(dim=1).tolist()
    assert model.generate_captions(features, text, GREEDY) == [row[i] for row, i in zip(rows, best, strict=True)]
    assert asked == [model.config.candidates] == [5]  # the preset names none: the config's default
    if which == "trained":
        assert best == [3] * 5  # CLIP learned which caption is the image's, wherever beam search put it
    else:
        assert len(set(best)) > 1  # an untrained CLIP scores arbitrarily, and the choice follows it
    two = _clip_scores(model, text, features, [row[:2] for row in rows]).argmax(dim=1).tolist()
    assert model.generate_captions(features, text, BEAM.with_candidates(2)) == [row[i] for row, i in zip(rows, two, strict=True)]
    assert model.generate_captions(features, text, BEAM.with_candidates(1)) == [row[0] for row in rows]  # one: no reranking


# -- checkpoints, compose, placement -------------------------------------------------------------


def test_checkpoint_round_trip_keeps_weights_and_captions(trained, tmp_path):
    model, text, features, _, _ = trained
    sha = checkpoint.save(model, text, tmp_path / "ckpt", checkpoint.Provenance())
    loaded, loaded_text, provenance = checkpoint.load(tmp_path / "ckpt")
    assert isinstance(loaded, SbgModel) and provenance["weights_sha256"] == sha and loaded.config == model.config
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert (tmp_path / "ckpt" / CLIP_FOLDER).is_dir()
    for preset in (GREEDY, BEAM.with_candidates(2)):
        assert loaded.generate_captions(features, loaded_text, preset) == model.generate_captions(features, text, preset)


@pytest.mark.parametrize("train_clip", [True, False])
def test_bf16_placement_still_generates_on_cpu(trained, data, tmp_path, train_clip):
    captions, pixels = data
    model, text = (trained[0], trained[1]) if train_clip else tiny_sbg(captions, train_clip=False)
    checkpoint.save(model, text, tmp_path / "ckpt", checkpoint.Provenance())
    placed, placed_text, _ = checkpoint.load(tmp_path / "ckpt", "cpu", torch.bfloat16)
    assert next(placed.clip.parameters()).dtype == torch.bfloat16
    assert next(placed.clip_text.parameters()).dtype == (torch.float32 if train_clip else torch.bfloat16)
    assert next(placed.lm.parameters()).dtype == placed.image_adapter.weight.dtype == torch.float32
    features = placed.encode(pixels)
    for preset in (GREEDY, BEAM.with_candidates(2)):
        out = placed.generate_captions(features, placed_text, preset)
        assert len(out) == 5 and all(isinstance(c, str) for c in out)
        if train_clip:
            assert all(reproduced(out, captions))


@pytest.fixture(scope="module")
def parts(tmp_path_factory, data):
    captions, _ = data
    root = tmp_path_factory.mktemp("parts")
    return root, save_tiny_clip(root / "clip", captions), save_tiny_gpt2(root / "gpt2", captions)


def test_compose_loads_both_clip_towers_gpt2_and_builds_the_keywords(parts, data, tmp_path):
    captions, pixels = data
    root, clip, gpt2 = parts
    out = compose_sbg(
        tmp_path / "out", clip=str(root / "clip"), gpt2=str(root / "gpt2"), captions=captions, min_count=2, log=lambda _: None
    )
    model, text, provenance = checkpoint.load(out)
    assert model.config.keywords == build_keywords(captions, min_count=2) and "lesion" in model.config.keywords
    source = clip.state_dict()
    towers = ((model.clip.model, ("vision_model.", "visual_projection.")), (model.clip_text.model, ("text_model.", "text_projection.")))
    for part, prefixes in towers:
        own = part.state_dict()
        names = [n for n in source if n.startswith(prefixes)]
        assert names and all(torch.equal(own[n], source[n]) for n in names)
    assert float(model.logit_scale.detach()) == pytest.approx(float(clip.logit_scale.detach()))
    assert all(torch.equal(model.lm.state_dict()[n], v) for n, v in gpt2.state_dict().items())
    assert text.clip("axial ct").input_ids == save_tiny_clip_ids(root / "clip", "axial ct")
    assert [s["source"] for s in provenance["sources"]][:2] == [str(root / "clip"), str(root / "gpt2")]
    assert "keyword vocabulary" in provenance["sources"][2]["part"]
    # The composed text tower embeds as the source CLIP does.
    tokens = ClipTokens(text.clip, model.config.clip_text_tokens)(["axial ct of the head"])
    with torch.no_grad():
        expected = clip.get_text_features(**tokens)
    expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
    assert torch.allclose(model.clip_text(**tokens), expected, atol=1e-5)
    assert len(model.generate_captions(model.encode(pixels), text, GREEDY.with_candidates(2))) == 5


def save_tiny_clip_ids(directory, sentence: str) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(directory)(sentence).input_ids)


def test_compose_refuses_what_cannot_work(parts, data, tmp_path):
    captions, _ = data
    root, clip, _ = parts
    with pytest.raises(ComposeError, match="keyword"):
        compose_sbg(tmp_path / "a", clip=str(root / "clip"), gpt2=str(root / "gpt2"), captions=["one caption"], log=lambda _: None)
    # A CLIP whose config pools at another token than its tokenizer's eos.
    wrong = tmp_path / "clip-wrong-eos"
    clip.config.text_config.eos_token_id = 0
    try:
        clip.save_pretrained(wrong)
    finally:
        clip.config.text_config.eos_token_id = 1
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(root / "clip").save_pretrained(wrong)
    with pytest.raises(ComposeError, match="eos_token_id"):
        compose_sbg(tmp_path / "b", clip=str(wrong), gpt2=str(root / "gpt2"), captions=captions, log=lambda _: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_keyword_embeddings_are_computed_once_at_inference_and_never_stale():
    captions, pixels = training_set()
    model, text = tiny_sbg(captions)
    model.eval()
    with torch.no_grad():
        first = model.keyword_embeddings(text)
        assert model.keyword_embeddings(text) is first  # cached: not recomputed per batch
        model.clip_text.model.text_projection.weight.add_(torch.randn_like(model.clip_text.model.text_projection.weight))
        model.load_state_dict(model.state_dict())  # new weights: the cache goes
        assert not torch.allclose(model.keyword_embeddings(text), first)
    model.train()
    assert model._keywords is None
    assert model.keyword_embeddings(text).requires_grad  # training always recomputes, with gradients
