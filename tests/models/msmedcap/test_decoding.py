"""The fast greedy decoder gives transformers' greedy search, token for token, on CPU (no graphs here)."""

from __future__ import annotations

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from models.generation import PRESETS
from models.msmedcap.decoding import Greedy, GreedyDecoder, bucket
from models.msmedcap.model import MedCapModel
from models.msmedcap.tiny import tiny_config
from tests.models.parts import one_thread, tiny_tokenizers


def tiny_opt(**overrides) -> OPTForCausalLM:
    torch.manual_seed(0)
    values = dict(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )
    config = OPTConfig(**(values | overrides))
    return OPTForCausalLM(config).eval()


def reference(lm, embeds, greedy: Greedy) -> torch.Tensor:
    return lm.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
        do_sample=False,
        num_beams=1,
        max_new_tokens=greedy.max_new_tokens,
        min_new_tokens=greedy.min_new_tokens,
        repetition_penalty=greedy.repetition_penalty,
        eos_token_id=greedy.eos_id,
        pad_token_id=greedy.pad_id,
    )


@pytest.mark.parametrize(
    "variant", [{}, {"word_embed_proj_dim": 16, "do_layer_norm_before": False}], ids=["opt-2.7b-like", "opt-350m-like"]
)
@pytest.mark.parametrize(("min_new", "penalty"), [(0, 1.0), (5, 1.0), (1, 1.5)])
def test_greedy_equals_generate(variant, min_new, penalty):
    lm = tiny_opt(init_std=0.2, **variant)  # wide weights: varied tokens, not one repeated
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(3, 7, lm.config.word_embed_proj_dim, generator=g)
    with one_thread():
        # An EOS that row 0 reaches after the minimum length: the token it writes there.
        probe = reference(lm, embeds, Greedy(12, min_new, penalty, eos_id=59, pad_id=1))
        eos = int(probe[0, min_new + 1])
        greedy = Greedy(12, min_new, penalty, eos_id=eos, pad_id=1)
        expected = reference(lm, embeds, greedy)
        got = GreedyDecoder(lm).generate(embeds, greedy)
    assert torch.equal(got, expected), (got, expected)
    assert (expected == eos).any()  # the EOS path is exercised


def test_padding_to_a_bucket_changes_nothing():
    lm = tiny_opt()
    embeds = torch.randn(5, 4, 32, generator=torch.Generator().manual_seed(2))
    greedy = Greedy(6, 1, 1.0, eos_id=7, pad_id=1)
    decoder = GreedyDecoder(lm)
    with one_thread():
        assert torch.equal(decoder.generate(embeds, greedy)[2:3], decoder.generate(embeds[2:3], greedy))
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9, 33, 64, 65, 130)] == [1, 2, 4, 8, 8, 16, 64, 64, 128, 192]


def test_captioning_uses_it_and_agrees_with_generate():
    tokenizers = tiny_tokenizers()
    torch.manual_seed(0)
    model = MedCapModel(tiny_config("msmedcap", lm_vocab=len(tokenizers.lm), qformer_vocab=len(tokenizers.qformer))).eval()
    g = torch.Generator().manual_seed(0)
    pixels = {b: torch.randn(4, 3, 64, 64, generator=g) for b in model.config.branches}
    prompt = tokenizers.prompt_batch("a photo of", 4)
    args = (pixels, prompt["input_ids"], prompt["attention_mask"], PRESETS["fast"], tokenizers.eos_id("\n"), 1)
    with one_thread():
        fast = model.generate(*args)
        assert model._greedy is not None
        model.fast_greedy = False
        assert torch.equal(fast, model.generate(*args))


def test_a_prefix_longer_than_the_positions_is_refused():
    lm = tiny_opt()
    with pytest.raises(ValueError, match="exceed the LM's 64 positions"):
        GreedyDecoder(lm).generate(torch.randn(1, 60, 32), Greedy(10, 0, 1.0, 2, 1))
