"""``medcap model compose`` through the production code path, from tiny parts saved locally."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dicom_io.image_views import ImageView
from models import checkpoint
from models.msmedcap.compose import compose, sam_config_from_weights, sam_pth_to_hf
from models.sources import ComposeError
from tests.models.parts import save_tiny_bert, save_tiny_blip2, save_tiny_blip2_itm, save_tiny_sam_hf, save_tiny_sam_pth, tiny_tokenizers


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    tokenizers = tiny_tokenizers()
    save_tiny_blip2(root / "blip2", tokenizers)
    save_tiny_bert(root / "bert")
    save_tiny_sam_hf(root / "sam-hf")
    _, reference = save_tiny_sam_pth(root / "medsam_vit_tiny.pth")
    return root, reference


def _compose(root, sam, out, **kw):
    return compose(blip2=str(root / "blip2"), sam=str(sam) if sam else None, out=out, bert=str(root / "bert"), log=lambda _: None, **kw)


def _bert(root):
    return load_file(root / "bert" / "model.safetensors")


@pytest.mark.parametrize("sam_source", ["sam-hf", "medsam_vit_tiny.pth"])
def test_compose_loads_every_part_exactly(parts, tmp_path, sam_source):
    from transformers import Blip2ForConditionalGeneration

    root, reference = parts
    sha = _compose(root, root / sam_source, tmp_path / "out")
    model, tokenizers, provenance = checkpoint.load(tmp_path / "out")
    blip = Blip2ForConditionalGeneration.from_pretrained(root / "blip2")
    assert provenance["weights_sha256"] == sha
    for name, value in blip.vision_model.state_dict().items():
        assert torch.equal(model.encoders["clip"].model.state_dict()[name], value), name
    for name, value in blip.language_model.state_dict().items():
        assert torch.equal(model.lm.state_dict()[name], value), name
    assert torch.equal(model.branches["clip"].query_tokens, blip.query_tokens)
    clip_q = model.branches["clip"].qformer.state_dict()
    for name, value in blip.qformer.state_dict().items():
        assert torch.equal(clip_q[name], value), name
    # SAM: the image encoder exactly, its positional matrix too, whichever format it came in.
    sam_state = model.encoders["sam"].model.state_dict()
    for name, value in reference.vision_encoder.state_dict().items():
        assert torch.equal(sam_state["vision_encoder." + name], value), name
    assert torch.equal(model.encoders["sam"].positional_gaussian, reference.shared_image_embedding.positional_embedding)
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    sam_line = next(line for line in card.splitlines() if line.startswith("- SAM Q-Former:"))
    assert sam_source in card and set(sam_line.split(": ", 1)[1].removesuffix(" (train stage 1, then 2)").split(", ")) == {
        "queries",
        "ITC temperature (0.07)",
        "cross-attention",
        "ITC projections",
        "ITM head",
        "projection into the LM",
    }
    assert len(tokenizers.qformer) == len(tokenizers.qformer.get_vocab())


def test_both_text_sides_and_the_sam_qformer_start_from_bert(parts, tmp_path):
    """LAVIS initialises every Q-Former from bert-base-uncased: no text side starts from noise."""
    root, _ = parts
    _compose(root, root / "sam-hf", tmp_path / "out")
    model, tokenizers, _ = checkpoint.load(tmp_path / "out")
    bert = _bert(root)
    rows = bert["bert.embeddings.word_embeddings.weight"].shape[0]
    assert len(tokenizers.qformer) == rows + 1 and tokenizers.qformer.convert_tokens_to_ids("[DEC]") == rows  # [DEC] appended
    for name in ("clip", "sam"):
        branch = model.branches[name].state_dict()
        assert torch.equal(branch["embeddings.word_embeddings.weight"][:rows], bert["bert.embeddings.word_embeddings.weight"]), name
        assert torch.equal(branch["embeddings.position_embeddings.weight"], bert["bert.embeddings.position_embeddings.weight"]), name
        for layer in (0, 1):
            for part in ("intermediate.dense.weight", "output.dense.weight", "output.LayerNorm.weight"):
                assert torch.equal(branch[f"qformer.encoder.layer.{layer}.{part}"], bert[f"bert.encoder.layer.{layer}.{part}"]), (
                    name,
                    part,
                )
        assert torch.equal(branch["lm_head.dense.weight"], bert["cls.predictions.transform.dense.weight"])
        assert torch.equal(branch["lm_head.layer_norm.bias"], bert["cls.predictions.transform.LayerNorm.bias"])
        assert torch.equal(branch["lm_head.bias"][:rows], bert["cls.predictions.bias"])
    # The SAM Q-Former is BERT throughout: self-attention, query feed-forward (a copy of the text one), embedding LayerNorm.
    sam = model.branches["sam"].state_dict()
    assert torch.equal(
        sam["qformer.encoder.layer.1.attention.attention.value.weight"], bert["bert.encoder.layer.1.attention.self.value.weight"]
    )
    assert torch.equal(
        sam["qformer.encoder.layer.0.intermediate_query.dense.weight"], bert["bert.encoder.layer.0.intermediate.dense.weight"]
    )
    assert torch.equal(sam["qformer.layernorm.weight"], bert["bert.embeddings.LayerNorm.weight"])
    # ... except what reads SAM, which is new: cross-attention keys take SAM's channel-layout width.
    assert sam["qformer.encoder.layer.0.crossattention.attention.key.weight"].shape[1] == model.encoders["sam"].width == 4 * 4
    # The CLIP query path stays BLIP-2's (stage 2), not BERT's.
    clip = model.branches["clip"].state_dict()
    assert not torch.equal(
        clip["qformer.encoder.layer.0.attention.attention.query.weight"], bert["bert.encoder.layer.0.attention.self.query.weight"]
    )


def test_the_clip_text_side_can_come_from_blip2_stage_1(parts, tmp_path):
    root, _ = parts
    vocab = load_file(root / "bert" / "model.safetensors")["bert.embeddings.word_embeddings.weight"].shape[0] + 1
    save_tiny_blip2_itm(tmp_path / "itm", vocab)
    _compose(root, root / "sam-hf", tmp_path / "out", blip2_itm=str(tmp_path / "itm"))
    model, _, provenance = checkpoint.load(tmp_path / "out")
    itm = load_file(tmp_path / "itm" / "model.safetensors")
    clip = model.branches["clip"].state_dict()
    assert torch.equal(clip["embeddings.word_embeddings.weight"], itm["embeddings.word_embeddings.weight"])
    assert torch.equal(clip["qformer.encoder.layer.1.output.dense.weight"], itm["qformer.encoder.layer.1.output.dense.weight"])
    assert torch.equal(clip["vision_proj.weight"], itm["vision_projection.weight"]) and torch.equal(
        clip["itm_head.bias"], itm["itm_head.bias"]
    )
    assert any("stage 1" in s["part"] for s in provenance["sources"])
    # The SAM branch is unaffected: still BERT's.
    assert torch.equal(
        model.branches["sam"].state_dict()["embeddings.position_embeddings.weight"],
        _bert(root)["bert.embeddings.position_embeddings.weight"],
    )
    with pytest.raises(ComposeError, match="not a Blip2ForImageTextRetrieval"):
        _compose(root, root / "sam-hf", tmp_path / "out2", blip2_itm=str(root / "bert"))


def test_a_bert_that_does_not_fit_the_qformer_is_refused(parts, tmp_path):
    root, _ = parts
    save_tiny_bert(tmp_path / "bert-wide", width=48)
    with pytest.raises(ComposeError, match="--bert .*hidden_size is 48"):
        compose(
            blip2=str(root / "blip2"), sam=str(root / "sam-hf"), out=tmp_path / "out", bert=str(tmp_path / "bert-wide"), log=lambda _: None
        )


def test_a_hub_id_is_read_from_the_hub_cache_with_its_positional_matrix(parts, tmp_path, monkeypatch):
    """Offline, a hub id is its snapshot in the local hub cache: the same files, read the same way
    (before, a hub id's SAM positional matrix was never read and the spatial layout got a random one)."""
    from huggingface_hub import constants

    root, reference = parts
    cache = tmp_path / "hub"
    for repo, source in (("facebook--sam-tiny", root / "sam-hf"), ("google--bert-tiny", root / "bert")):
        (cache / f"models--{repo}" / "refs").mkdir(parents=True)
        (cache / f"models--{repo}" / "refs" / "main").write_text("0123abcd")
        shutil.copytree(source, cache / f"models--{repo}" / "snapshots" / "0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    compose(
        blip2=str(root / "blip2"),
        sam="facebook/sam-tiny",
        bert="google/bert-tiny",
        out=tmp_path / "out",
        sam_layout="spatial",
        log=lambda _: None,
    )
    model, _, provenance = checkpoint.load(tmp_path / "out")
    assert torch.equal(model.encoders["sam"].positional_gaussian, reference.shared_image_embedding.positional_embedding)
    assert provenance["sources"][-1]["sha256"] == checkpoint.sha256_file(root / "sam-hf" / "model.safetensors")
    with pytest.raises(ComposeError, match="facebook/sam-none is not a local path, and the hub cannot provide it"):
        compose(blip2=str(root / "blip2"), sam="facebook/sam-none", bert="google/bert-tiny", out=tmp_path / "out2", log=lambda _: None)


def test_the_spatial_layout_needs_sams_positional_matrix(parts, tmp_path):
    from transformers import SamVisionModel

    root, reference = parts
    SamVisionModel(reference.config.vision_config).save_pretrained(tmp_path / "vision-only")
    with pytest.raises(ComposeError, match="no positional encoding matrix"):
        _compose(root, tmp_path / "vision-only", tmp_path / "out", sam_layout="spatial")
    _compose(root, tmp_path / "vision-only", tmp_path / "out", sam_layout="channel")  # the channel layout does not read it
    assert "zeros, absent from the source" in (tmp_path / "out" / "MODEL_CARD.md").read_text()


def test_baselines_compose_from_the_same_parts(parts, tmp_path):
    root, _ = parts
    _compose(root, None, tmp_path / "blip2", model_type="blip2")
    _compose(root, root / "sam-hf", tmp_path / "sam_blip2", model_type="sam_blip2", sam_layout="spatial")
    assert tuple(checkpoint.load(tmp_path / "blip2")[0].branches) == ("clip",)
    assert checkpoint.load(tmp_path / "sam_blip2")[0].config.sam_layout == "spatial"


def test_frozen_parts_can_be_stored_in_bf16_and_the_paper_evaluates_at_364(parts, tmp_path):
    root, _ = parts
    _compose(root, root / "sam-hf", tmp_path / "out", frozen_dtype=torch.bfloat16, eval_image_size=48)
    stored = load_file(tmp_path / "out" / "model.safetensors")
    assert stored["lm.model.decoder.embed_tokens.weight"].dtype == torch.bfloat16
    assert stored["encoders.sam.model.vision_encoder.pos_embed"].dtype == torch.bfloat16
    assert stored["branches.sam.query_tokens"].dtype == torch.float32  # trained parts stay fp32
    model, _, _ = checkpoint.load(tmp_path / "out")
    assert model.config.views[0] == ImageView("clip", 48, "clip") and model.config.train_views[0] == ImageView("clip", 32, "clip")


def test_a_missing_weight_fails_loudly(parts, tmp_path):
    root, _ = parts
    broken = tmp_path / "blip2-broken"
    shutil.copytree(root / "blip2", broken)
    weights = load_file(broken / "model.safetensors")
    del weights[next(k for k in weights if "vision_model.encoder.layers.1" in k)]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ComposeError, match="1 missing weight"):
        compose(blip2=str(broken), sam=str(root / "sam-hf"), out=tmp_path / "out", bert=str(root / "bert"), log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_missing_paths_say_what_is_missing(parts, tmp_path):
    root, _ = parts
    with pytest.raises(ComposeError, match="--sam: .*nope.pth does not exist"):
        _compose(root, tmp_path / "nope.pth", tmp_path / "out")
    with pytest.raises(ComposeError, match="--sam is required"):
        _compose(root, None, tmp_path / "out", model_type="msmedcap")


def test_sam_pth_mapping_infers_the_architecture(parts):
    root, reference = parts
    weights, gaussian = sam_pth_to_hf(torch.load(root / "medsam_vit_tiny.pth", weights_only=True))
    config = sam_config_from_weights(weights)
    assert config == dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        global_attn_indexes=[1],
        window_size=2,
        output_channels=16,
        image_size=32,
        patch_size=8,
        mlp_dim=64,
    )
    assert gaussian is not None
