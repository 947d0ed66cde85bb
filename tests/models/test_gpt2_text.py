"""GPT-2 and CLIP text handling of ClipCap and SBG: batches, labels, decoding, tokenizers built offline."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, GPT2Config

from models.captions import pre_caption
from models.config import ConfigError
from models.generation import GenerationPreset
from models.gpt2_text import (
    CLIP_FOLDER,
    EOS,
    GPT2_FOLDER,
    IGNORE,
    ClipTokens,
    Gpt2Text,
    build_small_clip_tokenizer,
    build_small_gpt2_tokenizer,
    check_clip_eos,
    config_kwargs,
    generation_kwargs,
    load_tokenizer,
    tiny_clip_text_config,
)

CAPTIONS = [
    "Axial CT of the head. Small hyperdense lesion in the left hemisphere.",
    "coronal mr of the chest. no focal lesion.",
    "sagittal ct of the abdomen. large hypodense lesion in the anterior abdomen.",
]


@pytest.fixture(scope="module")
def text() -> Gpt2Text:
    return Gpt2Text(build_small_gpt2_tokenizer(CAPTIONS * 3))


@pytest.fixture(scope="module")
def clip_tokenizer():
    return build_small_clip_tokenizer(CAPTIONS * 3)


def test_gpt2_tokenizer_has_gpt2s_single_special_token(text):
    tok = text.tokenizer
    assert tok.eos_token == tok.pad_token == tok.bos_token == EOS
    assert text.eos_id == text.pad_id == tok.convert_tokens_to_ids(EOS)
    assert tok("axial ct").input_ids == text.ids("axial ct")  # no BOS added, as GPT-2
    assert tok.decode(text.ids("axial ct of the head")) == "axial ct of the head"


def test_a_hub_style_tokenizer_without_pad_gets_eos_as_pad(text, tmp_path):
    text.tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tmp_path)
    bare.pad_token = None
    assert Gpt2Text(bare).pad_id == text.eos_id


def test_caption_batch_appends_eos_and_masks_padding(text):
    batch = text.caption_batch(CAPTIONS, max_tokens=64)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    for i, caption in enumerate(CAPTIONS):
        expected = text.ids(pre_caption(caption)) + [text.eos_id]
        n = len(expected)
        assert ids[i, :n].tolist() == expected == labels[i, :n].tolist()
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert (labels[i, n:] == IGNORE).all()
    assert ids.shape[1] == max(len(text.ids(pre_caption(c))) + 1 for c in CAPTIONS)


def test_long_captions_are_cut_but_still_end(text):
    batch = text.caption_batch([CAPTIONS[2]], max_tokens=5)
    assert batch["input_ids"].shape == (1, 5)
    assert batch["labels"][0, -1] == text.eos_id


def test_prompted_batch_learns_the_caption_only(text):
    prompts = [text.ids("keywords: ct, head. caption:"), text.ids("keywords: mr. caption:")]
    batch = text.prompted_batch(prompts, CAPTIONS[:2], max_tokens=64)
    for i, (prompt, caption) in enumerate(zip(prompts, CAPTIONS[:2], strict=True)):
        target = text.ids(" " + pre_caption(caption)) + [text.eos_id]
        row = batch["input_ids"][i].tolist()
        assert row[: len(prompt)] == prompt  # tokenised apart: the prompt is exactly the inference prompt
        assert row[len(prompt) : len(prompt) + len(target)] == target
        assert (batch["labels"][i, : len(prompt)] == IGNORE).all()
        assert batch["labels"][i, len(prompt) : len(prompt) + len(target)].tolist() == target
        assert text.decode(row[len(prompt) :]) == pre_caption(caption)


def test_prompt_batch_pads_on_the_left(text):
    batch = text.prompt_batch([[5, 6, 7], [9]])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [text.pad_id, text.pad_id, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_decode_stops_at_the_first_eos_and_strips(text):
    ids = text.ids(" axial ct ") + [text.eos_id] + text.ids("junk")
    assert text.decode(torch.tensor(ids)) == "axial ct"
    assert text.decode_batch(torch.tensor([ids, ids])) == ["axial ct", "axial ct"]


def test_save_and_load(text, tmp_path):
    text.save(tmp_path)
    assert (tmp_path / GPT2_FOLDER).is_dir()
    loaded = Gpt2Text.load(tmp_path)
    assert loaded.ids(CAPTIONS[0]) == text.ids(CAPTIONS[0]) and loaded.pad_id == text.pad_id


def test_a_missing_tokenizer_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=GPT2_FOLDER):
        Gpt2Text.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=CLIP_FOLDER):
        load_tokenizer(tmp_path, CLIP_FOLDER)


def test_generation_kwargs_are_greedy_or_beam_never_sampling(text):
    preset = GenerationPreset("t", num_beams=1, max_new_tokens=20, min_new_tokens=2, repetition_penalty=1.5, length_penalty=0.8)
    greedy = generation_kwargs(text, preset)
    assert greedy["num_beams"] == 1 and greedy["do_sample"] is False
    assert (greedy["max_new_tokens"], greedy["min_new_tokens"], greedy["repetition_penalty"], greedy["length_penalty"]) == (20, 2, 1.5, 0.8)
    assert greedy["eos_token_id"] == greedy["pad_token_id"] == text.eos_id
    assert generation_kwargs(text, preset, 4)["num_beams"] == 4


def test_config_kwargs_keep_the_architecture_only():
    kwargs = config_kwargs(GPT2Config(n_embd=48, n_layer=3, n_head=3, vocab_size=99, output_hidden_states=True))
    assert kwargs["n_embd"] == 48 and kwargs["vocab_size"] == 99 and "eos_token_id" in kwargs
    assert not {"output_hidden_states", "architectures", "transformers_version", "model_type"} & set(kwargs)
    assert GPT2Config(**kwargs).n_layer == 3


# -- CLIP ----------------------------------------------------------------------------------------


def test_clip_tokenizer_is_lowercase_with_start_end_and_eos_padding(clip_tokenizer):
    tok = clip_tokenizer
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == tok.pad_token == EOS
    upper, lower = tok("AXIAL CT").input_ids, tok("axial ct").input_ids
    assert upper == lower and lower[0] == tok.bos_token_id and lower[-1] == tok.eos_token_id
    pieces = tok.convert_ids_to_tokens(tok("ct hemisphere").input_ids[1:-1])
    assert sum(p.endswith("</w>") for p in pieces) == 2 and pieces[-1].endswith("</w>")  # word ends marked, as CLIP's BPE
    batch = ClipTokens(tok, max_tokens=77)(["axial ct", CAPTIONS[0]])
    short = batch["attention_mask"][0].sum()
    assert (batch["input_ids"][0, short:] == tok.eos_token_id).all()


def test_clip_tokens_truncate_but_keep_the_end_token(clip_tokenizer):
    batch = ClipTokens(clip_tokenizer, max_tokens=6)([CAPTIONS[2]])
    assert batch["input_ids"].shape == (1, 6) and batch["input_ids"][0, -1] == clip_tokenizer.eos_token_id


def test_clip_text_tower_pools_at_the_first_eos(clip_tokenizer):
    config = tiny_clip_text_config(clip_tokenizer)
    check_clip_eos(config, clip_tokenizer)
    assert config["eos_token_id"] == clip_tokenizer.eos_token_id != 2
    torch.manual_seed(0)
    tower = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
    batch = ClipTokens(clip_tokenizer)(["axial ct", CAPTIONS[1]])
    with torch.no_grad():
        out = tower(**batch)
        alone = tower(**ClipTokens(clip_tokenizer)(["axial ct"])).text_embeds
    first_eos = int((batch["input_ids"][0] == clip_tokenizer.eos_token_id).nonzero()[0])
    assert first_eos == len(clip_tokenizer("axial ct").input_ids) - 1
    with torch.no_grad():
        expected = tower.text_projection(out.last_hidden_state[0, first_eos])
    assert torch.allclose(out.text_embeds[0], expected, atol=1e-6)
    assert torch.allclose(out.text_embeds[0], alone[0], atol=1e-5)  # padding does not change the embedding


def test_check_clip_eos_refuses_a_config_pooling_elsewhere(clip_tokenizer):
    config = tiny_clip_text_config(clip_tokenizer)
    with pytest.raises(ConfigError, match="eos_token_id"):
        check_clip_eos(config | {"eos_token_id": 0}, clip_tokenizer)
    # OpenAI's configs say 2 (legacy): fine where eos is the last id, as in OpenAI's vocabulary.
    with pytest.raises(ConfigError, match="eos_token_id"):
        check_clip_eos(config | {"eos_token_id": 2}, clip_tokenizer)
    check_clip_eos(config | {"eos_token_id": 2, "vocab_size": clip_tokenizer.eos_token_id + 1}, clip_tokenizer)
