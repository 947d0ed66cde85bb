"""``medcap model compose`` through the production code path, from tiny parts saved locally."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import checkpoint
from models.msmedcap.compose import compose, sam_config_from_weights, sam_pth_to_hf
from models.sources import ComposeError
from tests.models.parts import save_tiny_blip2, save_tiny_sam_hf, save_tiny_sam_pth, tiny_tokenizers


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    tokenizers = tiny_tokenizers()
    save_tiny_blip2(root / "blip2", tokenizers)
    tokenizers.qformer.save_pretrained(root / "bert")
    save_tiny_sam_hf(root / "sam-hf")
    _, reference = save_tiny_sam_pth(root / "medsam_vit_tiny.pth")
    return root, reference


def _compose(root, sam, out, **kw):
    return compose(blip2=str(root / "blip2"), sam=str(sam) if sam else None, out=out, qformer_tokenizer=str(root / "bert"),
                   log=lambda _: None, **kw)  # fmt: skip


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
    # The SAM Q-Former starts from the CLIP one except for cross-attention (its input width differs).
    sam_q = model.branches["sam"].qformer.state_dict()
    assert torch.equal(sam_q["encoder.layer.0.attention.attention.query.weight"], clip_q["encoder.layer.0.attention.attention.query.weight"])
    assert sam_q["encoder.layer.0.crossattention.attention.key.weight"].shape[1] == model.encoders["sam"].width == 4 * 4
    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert sam_source in card and "SAM Q-Former cross-attention" in card
    assert len(tokenizers.qformer) == len(tokenizers.qformer.get_vocab())


def test_baselines_compose_from_the_same_parts(parts, tmp_path):
    root, _ = parts
    _compose(root, None, tmp_path / "blip2", model_type="blip2")
    _compose(root, root / "sam-hf", tmp_path / "sam_blip2", model_type="sam_blip2", sam_layout="spatial")
    assert tuple(checkpoint.load(tmp_path / "blip2")[0].branches) == ("clip",)
    assert checkpoint.load(tmp_path / "sam_blip2")[0].config.sam_layout == "spatial"


def test_a_missing_weight_fails_loudly(parts, tmp_path):
    root, _ = parts
    broken = tmp_path / "blip2-broken"
    broken.mkdir()
    for f in (root / "blip2").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(broken / "model.safetensors")
    del weights[next(k for k in weights if "vision_model.encoder.layers.1" in k)]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ComposeError, match="missing"):
        compose(blip2=str(broken), sam=str(root / "sam-hf"), out=tmp_path / "out", qformer_tokenizer=str(root / "bert"), log=lambda _: None)
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
    assert config == dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, global_attn_indexes=[1], window_size=2,
                          output_channels=16, image_size=32, patch_size=8, mlp_dim=64)  # fmt: skip
    assert gaussian is not None
