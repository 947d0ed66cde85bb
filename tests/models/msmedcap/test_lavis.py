"""``medcap model import-lavis``: the authors' LAVIS checkpoints, with exactly the official key names, at tiny size.

The names below are written out from the official code (AHandsomePython/MSMedCap: blip2_opt.py,
blip2_qformer.py, blip2.py, Qformer.py) and LAVIS' runner, not derived from the importer's mapping.
"""

from __future__ import annotations

import pytest
import torch

from models import checkpoint, weights
from models.captioner import Captioner
from models.msmedcap.lavis import REPORT, import_lavis
from models.sources import ComposeError
from tests.models.parts import save_tiny_bert, save_tiny_blip2, save_tiny_sam_hf, tiny_tokenizers

H, INTER, LAYERS, QUERIES, LM = 32, 64, 2, 4, 32  # the tiny BLIP-2 of tests/models/parts.py
CLIP_WIDTH, SAM_WIDTH = 32, 16  # EVA width; SAM channel layout: a 4 x 4 map per channel


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    save_tiny_blip2(root / "blip2", tiny_tokenizers())
    save_tiny_bert(root / "bert")
    save_tiny_sam_hf(root / "sam")
    return root


def _qformer(prefix: str, width: int, g: torch.Generator, *, text_side: bool = False, vocab: int = 0) -> dict[str, torch.Tensor]:
    """A LAVIS ``BertLMHeadModel`` Q-Former's entries as LAVIS saves them (``cross_attention_freq`` 1 in the tiny BLIP-2)."""

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {
        f"{prefix}bert.embeddings.LayerNorm.weight": r(H),
        f"{prefix}bert.embeddings.LayerNorm.bias": r(H),
        f"{prefix}bert.embeddings.position_ids": torch.arange(512)[None],
    }
    for i in range(LAYERS):
        layer = f"{prefix}bert.encoder.layer.{i}."
        for kind, kv_width in (("attention", H), ("crossattention", width)):
            sd |= {
                layer + f"{kind}.self.query.weight": r(H, H),
                layer + f"{kind}.self.query.bias": r(H),
                layer + f"{kind}.self.key.weight": r(H, kv_width),
                layer + f"{kind}.self.key.bias": r(H),
                layer + f"{kind}.self.value.weight": r(H, kv_width),
                layer + f"{kind}.self.value.bias": r(H),
                layer + f"{kind}.output.dense.weight": r(H, H),
                layer + f"{kind}.output.dense.bias": r(H),
                layer + f"{kind}.output.LayerNorm.weight": r(H),
                layer + f"{kind}.output.LayerNorm.bias": r(H),
            }
        ffns = ("_query", "") if text_side else ("_query",)  # stage 2 sets layer.output/intermediate to None
        for suffix in ffns:
            sd |= {
                layer + f"intermediate{suffix}.dense.weight": r(INTER, H),
                layer + f"intermediate{suffix}.dense.bias": r(INTER),
                layer + f"output{suffix}.dense.weight": r(H, INTER),
                layer + f"output{suffix}.dense.bias": r(H),
                layer + f"output{suffix}.LayerNorm.weight": r(H),
                layer + f"output{suffix}.LayerNorm.bias": r(H),
            }
    if text_side:
        words = r(vocab, H)
        sd |= {
            f"{prefix}bert.embeddings.word_embeddings.weight": words,
            f"{prefix}bert.embeddings.position_embeddings.weight": r(512, H),
            f"{prefix}cls.predictions.bias": r(vocab),
            f"{prefix}cls.predictions.transform.dense.weight": r(H, H),
            f"{prefix}cls.predictions.transform.dense.bias": r(H),
            f"{prefix}cls.predictions.transform.LayerNorm.weight": r(H),
            f"{prefix}cls.predictions.transform.LayerNorm.bias": r(H),
            f"{prefix}cls.predictions.decoder.weight": words,
            f"{prefix}cls.predictions.decoder.bias": r(vocab),
        }
    return sd


def stage2_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """What LAVIS' runner saves after MSMedCap stage 2: trainable weights only (frozen EVA, SAM and OPT deleted)."""
    g = torch.Generator().manual_seed(seed)
    sd = _qformer("Qformer.", CLIP_WIDTH, g) | _qformer("sam_Qformer.", SAM_WIDTH, g)
    sd |= {
        "query_tokens": torch.randn(1, QUERIES, H, generator=g),
        "sam_query_tokens": torch.randn(1, QUERIES, H, generator=g),
        "opt_proj.weight": torch.randn(LM, H, generator=g),
        "opt_proj.bias": torch.randn(LM, generator=g),
        "sam_opt_proj.weight": torch.randn(LM, H, generator=g),
        "sam_opt_proj.bias": torch.randn(LM, generator=g),
        "ln_vision.weight": torch.randn(CLIP_WIDTH, generator=g),
        "ln_vision.bias": torch.randn(CLIP_WIDTH, generator=g),
    }
    return sd


def _save(path, state):
    torch.save(
        {"model": state, "optimizer": {"state": {}, "param_groups": []}, "config": {"run": {"max_epoch": 5}}, "scaler": None, "epoch": 4},
        path,
    )
    return path


def _import(parts, files, out, **kw):
    return import_lavis(
        files, out=out, blip2=str(parts / "blip2"), sam=str(parts / "sam"), bert=str(parts / "bert"), log=lambda _: None, **kw
    )


def test_a_stage2_checkpoint_becomes_an_inference_checkpoint(parts, tmp_path):
    state = stage2_state()
    _, coverage = _import(parts, [_save(tmp_path / "checkpoint_best.pth", state)], tmp_path / "out")
    model, _, provenance = checkpoint.load(tmp_path / "out")
    got = model.state_dict()
    expected = {
        "branches.clip.query_tokens": "query_tokens",
        "branches.sam.query_tokens": "sam_query_tokens",
        "branches.clip.language_projection.weight": "opt_proj.weight",
        "branches.sam.language_projection.bias": "sam_opt_proj.bias",
        "branches.clip.qformer.layernorm.weight": "Qformer.bert.embeddings.LayerNorm.weight",
        "branches.clip.qformer.encoder.layer.1.attention.attention.key.bias": "Qformer.bert.encoder.layer.1.attention.self.key.bias",
        "branches.sam.qformer.encoder.layer.0.crossattention.attention.value.weight": "sam_Qformer.bert.encoder.layer.0.crossattention.self.value.weight",
        "branches.sam.qformer.encoder.layer.1.crossattention.output.LayerNorm.bias": "sam_Qformer.bert.encoder.layer.1.crossattention.output.LayerNorm.bias",
        "branches.sam.qformer.encoder.layer.1.output_query.dense.weight": "sam_Qformer.bert.encoder.layer.1.output_query.dense.weight",
        "branches.clip.qformer.encoder.layer.0.intermediate_query.dense.bias": "Qformer.bert.encoder.layer.0.intermediate_query.dense.bias",
    }
    for ours, theirs in expected.items():
        assert torch.equal(got[ours], state[theirs]), ours
    # ln_vision is trained by LAVIS (never frozen): it comes from the file, into the ViT's post_layernorm (bf16 there).
    assert torch.equal(got["encoders.clip.model.post_layernorm.weight"], state["ln_vision.weight"].bfloat16())
    # Every trainable entry of the file was read; only the position-id buffers were not.
    assert len(coverage.by_target) == len(state) - 2 and all("position_ids" in u for u in coverage.unused)
    # An inference checkpoint: no text side, frozen parts in bf16.
    assert model.config.qformer_text is False and model.lm.lm_head.weight.dtype == torch.float32  # placed for CPU
    stored = {}
    for file in weights.weight_files(tmp_path / "out"):
        stored |= weights.TensorFiles(file).take(lambda k: k)
    assert stored["lm.model.decoder.embed_tokens.weight"].dtype == torch.bfloat16 and not any(
        k.startswith("branches.") and ".embeddings." in k for k in stored
    )
    report = (tmp_path / "out" / REPORT).read_text()
    assert "| `branches.sam.*` |" in report and "checkpoint_best.pth" in report
    assert provenance["sources"][0]["source"].endswith("checkpoint_best.pth")
    # and it captions
    captioner = Captioner.load(tmp_path / "out", "cpu")
    import numpy as np

    views = {"clip": np.zeros((2, 3, 32, 32), np.float32), "sam": np.zeros((2, 3, 32, 32), np.float32)}
    assert len(captioner.caption(views, "fast")) == 2


def test_stage1_files_keep_their_text_side_and_heads(parts, tmp_path):
    g = torch.Generator().manual_seed(1)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(parts / "bert")) + 1  # LAVIS: bert-base-uncased + [DEC]
    sam_stage1 = _qformer("sam_Qformer.", SAM_WIDTH, g, text_side=True, vocab=vocab) | {
        "sam_query_tokens": torch.randn(1, QUERIES, H, generator=g),
        "vision_proj.weight": torch.randn(256, H, generator=g),
        "vision_proj.bias": torch.randn(256, generator=g),
        "text_proj.weight": torch.randn(256, H, generator=g),
        "text_proj.bias": torch.randn(256, generator=g),
        "itm_head.weight": torch.randn(2, H, generator=g),
        "itm_head.bias": torch.randn(2, generator=g),
        "temp": torch.tensor(0.05),
    }
    files = [_save(tmp_path / "stage2.pth", stage2_state()), _save(tmp_path / "sam_stage1.pth", sam_stage1)]
    _import(parts, files, tmp_path / "out", keep_text_side=True)
    model, _, _ = checkpoint.load(tmp_path / "out")
    sam = model.branches["sam"]
    assert (
        model.config.qformer_text
        and torch.equal(sam.temp, torch.tensor(0.05))
        and torch.equal(sam.itm_head.weight, sam_stage1["itm_head.weight"])
    )
    assert torch.equal(sam.embeddings.word_embeddings.weight, sam_stage1["sam_Qformer.bert.embeddings.word_embeddings.weight"])
    assert torch.equal(sam.lm_head.bias, sam_stage1["sam_Qformer.cls.predictions.bias"])
    assert torch.equal(
        sam.qformer.encoder.layer[1].intermediate.dense.weight, sam_stage1["sam_Qformer.bert.encoder.layer.1.intermediate.dense.weight"]
    )
    # the later file wins for what both hold: the SAM queries are stage 1's
    assert torch.equal(sam.query_tokens, sam_stage1["sam_query_tokens"])
    wrong_vocab = sam_stage1 | {"sam_Qformer.bert.embeddings.word_embeddings.weight": torch.zeros(vocab + 3, H)}
    with pytest.raises(ComposeError, match="word_embeddings.weight has shape"):
        _import(parts, [files[0], _save(tmp_path / "other_vocab.pth", wrong_vocab)], tmp_path / "out2", keep_text_side=True)


def test_entries_nothing_reads_and_missing_qformers_are_errors(parts, tmp_path):
    state = stage2_state() | {"Qformer.bert.encoder.layer.0.adapter.weight": torch.zeros(2)}
    with pytest.raises(ComposeError, match="adapter.weight matches no MSMedCap weight"):
        _import(parts, [_save(tmp_path / "odd.pth", state)], tmp_path / "out")
    clip_only = {k: v for k, v in stage2_state().items() if not k.startswith(("sam_Qformer.", "sam_query_tokens", "sam_opt_proj"))}
    with pytest.raises(ComposeError, match="no sam_Qformer"):
        _import(parts, [_save(tmp_path / "clip.pth", clip_only)], tmp_path / "out")
    _import(parts, [tmp_path / "clip.pth"], tmp_path / "blip2", model_type="blip2")  # ... which is a BLIP-2
    with pytest.raises(ComposeError, match="for a branch that BLIP-2 does not have"):
        _import(parts, [_save(tmp_path / "full.pth", stage2_state())], tmp_path / "out", model_type="blip2")
    with pytest.raises(ComposeError, match="nope.pth does not exist"):
        _import(parts, [tmp_path / "nope.pth"], tmp_path / "out")
