"""Build a MedCap checkpoint from real pretrained parts (``medcap model compose``).

* CLIP branch, Q-Former, projection and OPT: a BLIP-2 checkpoint in Hugging Face format
  (``Salesforce/blip2-opt-2.7b`` or a local copy), loaded as the full model and taken apart
  (loading ``Blip2VisionModel`` from a full BLIP-2 checkpoint silently loads nothing).
* SAM encoder: a Hugging Face SAM (``facebook/sam-vit-base``, ``wanglab/medsam-vit-base``) or an
  original segment-anything ``.pth`` (SAM, MedSAM), mapped key by key. No torchvision needed.
* SAM Q-Former: new. Its self-attention and feed-forward weights start from the CLIP Q-Former
  (itself BERT-initialised and stage-1 trained), its cross-attention is new (its input width
  differs); stage 1 then trains it. Everything new is listed in the model card.

Every expected weight of a loaded part must be present: a missing one is an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from models.checkpoint import Provenance, save
from models.msmedcap.config import MODEL_TYPES, MedCapConfig
from models.msmedcap.model import MedCapModel
from models.msmedcap.tokenizers import QFORMER_BOS, Tokenizers
from models.sources import ComposeError, from_pretrained_strict, resolve, source_sha

Log = Callable[[str], None]


def load_blip2(source: str) -> Any:
    from transformers import Blip2ForConditionalGeneration

    return from_pretrained_strict(Blip2ForConditionalGeneration, resolve(source, "--blip2"), "--blip2", "BLIP-2")


# -- SAM ------------------------------------------------------------------------------------

_SAM_RENAMES = [  # original segment-anything -> transformers SamVisionModel (convert_sam_to_hf.py)
    ("image_encoder.", "vision_encoder."),
    ("patch_embed.proj", "patch_embed.projection"),
    ("blocks.", "layers."),
    (".norm1", ".layer_norm1"),
    (".norm2", ".layer_norm2"),
    ("neck.0", "neck.conv1"),
    ("neck.1", "neck.layer_norm1"),
    ("neck.2", "neck.conv2"),
    ("neck.3", "neck.layer_norm2"),
]
SAM_PE_KEY_PTH = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
SAM_PE_KEY_HF = "shared_image_embedding.positional_embedding"


def sam_pth_to_hf(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Image-encoder weights of an original SAM/MedSAM checkpoint under transformers' names."""
    mapped = {}
    for key, value in state.items():
        if not key.startswith("image_encoder."):
            continue
        for old, new in _SAM_RENAMES:
            key = key.replace(old, new)
        mapped[key] = value
    if not mapped:
        raise ComposeError("the .pth holds no image_encoder.* weights: not a segment-anything checkpoint")
    return mapped, state.get(SAM_PE_KEY_PTH)


def sam_config_from_weights(weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Infer the SamVisionConfig of an original checkpoint from its tensor shapes."""
    hidden, _, patch, _ = weights["vision_encoder.patch_embed.projection.weight"].shape
    grid = weights["vision_encoder.pos_embed"].shape[1]
    layers = sorted({int(m.group(1)) for k in weights if (m := re.match(r"vision_encoder\.layers\.(\d+)\.", k))})
    rel = {i: weights[f"vision_encoder.layers.{i}.attn.rel_pos_h"].shape for i in layers}
    global_layers = [i for i in layers if rel[i][0] == 2 * grid - 1]
    windowed = [rel[i][0] for i in layers if i not in global_layers]
    head_dim = rel[layers[0]][1]
    return dict(
        hidden_size=int(hidden), num_hidden_layers=len(layers), num_attention_heads=int(hidden // head_dim),
        global_attn_indexes=global_layers, window_size=int((windowed[0] + 1) // 2) if windowed else 14,
        output_channels=int(weights["vision_encoder.neck.conv1.weight"].shape[0]), image_size=int(grid * patch),
        patch_size=int(patch), mlp_dim=int(weights["vision_encoder.layers.0.mlp.lin1.weight"].shape[0]),
    )  # fmt: skip


def load_sam(source: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]:
    """(SamVisionConfig kwargs, vision weights under ``vision_encoder.*``, positional gaussian or None)."""
    resolved = resolve(source, "--sam")
    if isinstance(resolved, Path) and resolved.is_file():
        state = torch.load(resolved, map_location="cpu", weights_only=True)
        weights, gaussian = sam_pth_to_hf(state)
        return sam_config_from_weights(weights), weights, gaussian
    from transformers import SamVisionConfig, SamVisionModel

    model = from_pretrained_strict(SamVisionModel, resolved, "--sam", "SAM")
    config = SamVisionConfig.to_dict(model.config)
    gaussian = _read_tensor(Path(resolved), SAM_PE_KEY_HF) if isinstance(resolved, Path) else None
    keep = set(SamVisionConfig().to_dict()) - {"transformers_version", "model_type", "architectures"}
    return {k: v for k, v in config.items() if k in keep}, dict(model.state_dict()), gaussian


def _read_tensor(directory: Path, key: str) -> torch.Tensor | None:
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            if key in f.keys():
                return f.get_tensor(key)
    return None


# -- compose --------------------------------------------------------------------------------


def _vision_kwargs(hf_config: Any) -> dict[str, Any]:
    from transformers import Blip2VisionConfig

    keep = set(Blip2VisionConfig().to_dict()) - {"transformers_version", "model_type", "architectures"}
    return {k: v for k, v in hf_config.to_dict().items() if k in keep}


def _qformer_kwargs(hf_config: Any) -> dict[str, Any]:
    from transformers import Blip2QFormerConfig

    drop = {"transformers_version", "model_type", "architectures", "encoder_hidden_size", "use_qformer_text_input"}
    keep = set(Blip2QFormerConfig().to_dict()) - drop
    return {k: v for k, v in hf_config.to_dict().items() if k in keep}


def _lm_kwargs(hf_config: Any) -> dict[str, Any]:
    from transformers import OPTConfig

    keep = set(OPTConfig().to_dict()) - {"transformers_version", "model_type", "architectures"}
    return {k: v for k, v in hf_config.to_dict().items() if k in keep}


def compose(
    *, blip2: str, sam: str | None, out: Path, model_type: str = "msmedcap", qformer_tokenizer: str, sam_layout: str = "channel",
    prompt: str = "", name: str = "", log: Log = print,
) -> str:  # fmt: skip
    """Write a checkpoint to ``out``; returns the weights' sha256."""
    from transformers import AutoTokenizer

    if model_type not in MODEL_TYPES:
        raise ComposeError(f"--model-type: {model_type!r} is not one of {sorted(MODEL_TYPES)}")
    if "sam" in MODEL_TYPES[model_type] and not sam:
        raise ComposeError(f"--sam is required for {model_type}")
    log(f"loading BLIP-2 from {blip2}")
    blip = load_blip2(blip2)
    provenance = Provenance(sources=[{"part": "CLIP ViT, CLIP Q-Former, projection, OPT", "source": blip2, "sha256": source_sha(resolve(blip2, "--blip2"))}])
    sam_kwargs, sam_weights, gaussian = (None, None, None)
    if "sam" in MODEL_TYPES[model_type]:
        log(f"loading SAM from {sam}")
        sam_kwargs, sam_weights, gaussian = load_sam(sam)  # type: ignore[arg-type]
        provenance.sources.append({"part": "SAM image encoder", "source": sam, "sha256": source_sha(resolve(sam, "--sam"))})  # type: ignore[arg-type]

    lm_tok = AutoTokenizer.from_pretrained(resolve(blip2, "--blip2"))
    q_tok = AutoTokenizer.from_pretrained(resolve(qformer_tokenizer, "--qformer-tokenizer"))
    if QFORMER_BOS not in q_tok.get_vocab():
        q_tok.add_special_tokens({"bos_token": QFORMER_BOS})
    provenance.sources.append({"part": "Q-Former tokenizer", "source": qformer_tokenizer, "sha256": "n/a"})

    config = MedCapConfig(
        model_type=model_type, clip_vision=_vision_kwargs(blip.config.vision_config), sam_vision=sam_kwargs,
        qformer=_qformer_kwargs(blip.config.qformer_config) | {"vocab_size": len(q_tok)}, lm=_lm_kwargs(blip.config.text_config),
        num_query_tokens=blip.config.num_query_tokens, sam_layout=sam_layout,
        clip_image_size=blip.config.vision_config.image_size,
        sam_image_size=int(sam_kwargs["image_size"]) if sam_kwargs else 1024, prompt=prompt, name=name,
    ).with_model_type(model_type)  # fmt: skip
    log(f"building {config.display_name}")
    model = MedCapModel(config)
    _copy_exact(model.lm, blip.language_model.state_dict(), "OPT language model")
    if "clip" in config.branches:
        _copy_exact(model.encoders["clip"].model, blip.vision_model.state_dict(), "CLIP vision encoder")
        branch = model.branches["clip"]
        with torch.no_grad():
            branch.query_tokens.copy_(blip.query_tokens)
            branch.language_projection.load_state_dict(blip.language_projection.state_dict())
        _copy_query_path(branch.qformer, blip.qformer.state_dict(), "CLIP Q-Former", include_cross_attention=True)
        provenance.initialised.append("CLIP branch text side (embeddings, text feed-forward, ITC/ITM/ITG heads): stage 1 only")
    if "sam" in config.branches:
        encoder = model.encoders["sam"]
        _copy_exact(encoder.model, sam_weights, "SAM image encoder")  # type: ignore[arg-type]
        if gaussian is not None:
            with torch.no_grad():
                encoder.positional_gaussian.copy_(gaussian)
        elif sam_layout == "spatial":
            provenance.initialised.append("SAM positional encoding matrix (not in the SAM source)")
        if "clip" in config.branches:
            _copy_query_path(model.branches["sam"].qformer, blip.qformer.state_dict(), "SAM Q-Former from CLIP Q-Former",
                             include_cross_attention=False)  # fmt: skip
            provenance.initialised.append("SAM Q-Former cross-attention, queries, projection, text side (train stage 1, then 2)")
        else:
            provenance.initialised.append("SAM Q-Former entirely (train stage 1, then 2)")
    if "clip" not in config.branches:
        provenance.initialised.append("no CLIP branch (SAM-BLIP2)")
    sha = save(model, Tokenizers(lm_tok, q_tok), out, provenance)
    log(f"wrote {out} (weights sha256 {sha})")
    return sha


def _copy_exact(target: torch.nn.Module, source: dict[str, torch.Tensor], what: str) -> None:
    expected = set(target.state_dict())
    missing = expected - set(source)
    if missing:
        raise ComposeError(f"{what}: {len(missing)} weight(s) missing from the source, e.g. {sorted(missing)[:5]}")
    target.load_state_dict({k: source[k] for k in expected}, strict=True)


def _copy_query_path(target: torch.nn.Module, source: dict[str, torch.Tensor], what: str, include_cross_attention: bool) -> None:
    """Copy a BLIP-2 Q-Former (query path only) into a branch Q-Former that also has a text path.

    The text feed-forward layers, absent from stage-2 BLIP-2 checkpoints, start as copies of
    the query ones (LAVIS initialises the query FFN from the text FFN; this is the reverse).
    """
    own = target.state_dict()
    update = {}
    for key in own:
        if ".crossattention." in key and not include_cross_attention:
            continue
        text_ffn = re.sub(r"\.(intermediate|output)\.", lambda m: f".{m.group(1)}_query.", key)
        src = key if key in source else text_ffn if text_ffn in source else None
        if src is None:
            raise ComposeError(f"{what}: weight {key} has no source")
        if source[src].shape != own[key].shape:
            raise ComposeError(f"{what}: {key} has shape {tuple(source[src].shape)} in the source, {tuple(own[key].shape)} here")
        update[key] = source[src]
    target.load_state_dict(update, strict=False)
