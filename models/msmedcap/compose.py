"""Build an MSMedCap-family checkpoint from real pretrained parts (``medcap model compose``).

* ``--blip2`` (``Salesforce/blip2-opt-2.7b`` or a local copy, Hugging Face format): the EVA ViT
  (with LAVIS' ``ln_vision`` as its ``post_layernorm``), the CLIP Q-Former's query path, its
  queries and projection, and OPT.
* ``--sam``: a Hugging Face SAM (``facebook/sam-vit-base``, ``wanglab/medsam-vit-base``) or an
  original segment-anything ``.pth`` (SAM, MedSAM), mapped key by key. No torchvision needed.
* ``--bert`` (``bert-base-uncased``): the Q-Former tokenizer, and both Q-Formers' text side (word
  and position embeddings, text feed-forward layers, the ITG head), as LAVIS initialises every
  Q-Former from BERT. The SAM Q-Former is BERT throughout (self-attention, both feed-forward
  layers, its embedding LayerNorm): LAVIS' ``init_sam_Qformer``; its cross-attention, queries,
  ITC/ITM heads and projection are new, since its input is new.
* ``--blip2-itm`` (optional, ``Salesforce/blip2-itm-vit-g``, BLIP-2's stage 1): the CLIP branch's
  text side (embeddings, text feed-forward layers, ITC projections, ITM head) as BLIP-2's stage 1
  trained it, instead of BERT's.

Lean: the pretrained parts are built without memory and take each tensor from its file as it
is read (``models/weights.py``), so composing the 4.13 B-parameter model holds one copy of it.
Strict: every expected weight of a part must be in its source, and anything left without a
weight at the end is an error; what starts untrained is listed in the model card.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import weights
from models.checkpoint import Provenance, save, swap_in
from models.msmedcap.config import MODEL_TYPES, MedCapConfig
from models.msmedcap.model import MedCapModel
from models.msmedcap.tokenizers import QFORMER_BOS, Tokenizers
from models.sources import ComposeError, resolve, source_sha
from models.weights import TensorFiles, prefixed

Log = Callable[[str], None]
#: The CLIP view for captioning when the ViT was trained at 224 px: the paper evaluates at 364.
PAPER_EVAL_IMAGE_SIZE = 364

# -- SAM ------------------------------------------------------------------------------------

SAM_RENAMES = [  # original segment-anything -> transformers SamVisionModel (convert_sam_to_hf.py)
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
        for old, new in SAM_RENAMES:
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
        hidden_size=int(hidden),
        num_hidden_layers=len(layers),
        num_attention_heads=int(hidden // head_dim),
        global_attn_indexes=global_layers,
        window_size=int((windowed[0] + 1) // 2) if windowed else 14,
        output_channels=int(weights["vision_encoder.neck.conv1.weight"].shape[0]),
        image_size=int(grid * patch),
        patch_size=int(patch),
        mlp_dim=int(weights["vision_encoder.layers.0.mlp.lin1.weight"].shape[0]),
    )


def load_sam(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]:
    """(SamVisionConfig kwargs, vision weights under ``vision_encoder.*``, positional gaussian or None)."""
    files = TensorFiles(path)
    if path.is_file():
        weights_, gaussian = sam_pth_to_hf({k: files.get(k) for k in files.keys() if k.startswith("image_encoder.") or k == SAM_PE_KEY_PTH})
        return sam_config_from_weights(weights_), weights_, gaussian
    from transformers import SamVisionConfig

    config = SamVisionConfig.from_pretrained(path).to_dict()
    keep = set(SamVisionConfig().to_dict()) - {"transformers_version", "model_type", "architectures"}
    vision = files.take(lambda k: k if k.startswith("vision_encoder.") else None)
    if not vision:
        raise ComposeError(f"--sam {path}: no vision_encoder.* weights: not a SAM checkpoint")
    return {k: v for k, v in config.items() if k in keep}, vision, files.get(SAM_PE_KEY_HF) if SAM_PE_KEY_HF in files else None


# -- Q-Former names: BERT / LAVIS -> a MedCap branch --------------------------------------------


def bert_names(key: str) -> str:
    """A BERT or LAVIS ``Qformer`` parameter name without its model prefix and with today's norm names."""
    key = re.sub(r"^(Qformer\.|sam_Qformer\.)?(bert\.)?", "", key)
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))


def branch_name(key: str, *, query_path: bool, text_side: bool, query_ffn_from_text: bool = True) -> list[str]:
    """Where a BERT-named Q-Former weight (``bert_names``) goes in a branch: [] if nowhere.

    ``query_path``: self-attention, cross-attention, the embedding LayerNorm and the query
    feed-forward layers (``query_ffn_from_text``, from BERT: the text feed-forward layers,
    copied, as LAVIS does; a LAVIS Q-Former has its own ``*_query`` layers).
    ``text_side``: word/position embeddings, text feed-forward layers, the ITG head.
    """
    if m := re.match(r"encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(.*)$", key):
        return [f"qformer.encoder.layer.{m[1]}.{m[2]}.attention.{m[3]}"] if query_path else []
    if m := re.match(r"encoder\.layer\.(\d+)\.(attention|crossattention)\.output\.(.*)$", key):
        return [f"qformer.encoder.layer.{m[1]}.{m[2]}.output.{m[3]}"] if query_path else []
    if m := re.match(r"encoder\.layer\.(\d+)\.(intermediate|output)_query\.(.*)$", key):
        return [f"qformer.encoder.layer.{m[1]}.{m[2]}_query.{m[3]}"] if query_path else []
    if m := re.match(r"encoder\.layer\.(\d+)\.(intermediate|output)\.(.*)$", key):
        text = [f"qformer.encoder.layer.{m[1]}.{m[2]}.{m[3]}"] if text_side else []
        return text + ([f"qformer.encoder.layer.{m[1]}.{m[2]}_query.{m[3]}"] if query_path and query_ffn_from_text else [])
    if m := re.match(r"embeddings\.LayerNorm\.(.*)$", key):
        return [f"qformer.layernorm.{m[1]}"] if query_path else []
    if m := re.match(r"embeddings\.(word_embeddings|position_embeddings)\.weight$", key):
        return [f"embeddings.{m[1]}.weight"] if text_side else []
    head = {
        "cls.predictions.transform.dense.weight": "lm_head.dense.weight",
        "cls.predictions.transform.dense.bias": "lm_head.dense.bias",
        "cls.predictions.transform.LayerNorm.weight": "lm_head.layer_norm.weight",
        "cls.predictions.transform.LayerNorm.bias": "lm_head.layer_norm.bias",
        "cls.predictions.bias": "lm_head.bias",
    }
    return [head[key]] if key in head and text_side else []


#: Weights whose first dimension may differ from the source's: the vocabulary (BERT has no [DEC];
#: its row keeps its initialisation) and the position table (the first rows are taken).
_ROWS_MAY_DIFFER = re.compile(r"^(embeddings\.(word|position)_embeddings\.weight|lm_head\.bias)$")


def fill(branch: nn.Module, values: dict[str, torch.Tensor], what: str, rows_may_differ: bool = True) -> set[str]:
    """Copy ``values`` into a (materialised) branch; returns the names filled. Shapes must match,
    except (``rows_may_differ``) the rows of a vocabulary or position table."""
    own = branch.state_dict()
    with torch.no_grad():
        for name, value in values.items():
            if name not in own:
                raise ComposeError(f"{what}: the model has no weight {name}")
            target = own[name]
            if tuple(value.shape) != tuple(target.shape):
                if not (rows_may_differ and _ROWS_MAY_DIFFER.match(name) and tuple(value.shape[1:]) == tuple(target.shape[1:])):
                    raise ComposeError(f"{what}: {name} has shape {tuple(value.shape)} in the source, {tuple(target.shape)} here")
                rows = min(value.shape[0], target.shape[0])
                target[:rows].copy_(value[:rows])
                continue
            target.copy_(value)
    return set(values)


def bert_into_branch(files: TensorFiles, *, query_path: bool, text_side: bool) -> dict[str, torch.Tensor]:
    """A branch's weights from a BERT checkpoint (any of BertModel, BertForPreTraining, BertLMHeadModel)."""
    out: dict[str, torch.Tensor] = {}
    for key in files.keys():
        for target in branch_name(bert_names(key), query_path=query_path, text_side=text_side):
            out[target] = files.get(key, torch.float32)
    return out


# -- what starts untrained, in words ------------------------------------------------------------------

_PARTS = [
    (r"\.crossattention\.", "cross-attention"),
    (r"^query_tokens$", "queries"),
    (r"^language_projection\.", "projection into the LM"),
    (r"^(vision|text)_proj\.", "ITC projections"),
    (r"^itm_head\.", "ITM head"),
    (r"^temp$", "ITC temperature (0.07)"),
    (r"^lm_head\.", "ITG head"),
    (r"^embeddings\.", "text embeddings"),
    (r"\.(intermediate|output)\.", "text feed-forward layers"),
    (r"\.(intermediate|output)_query\.", "query feed-forward layers"),
    (r"\.attention\.(attention|output)\.", "self-attention"),
    (r"^qformer\.layernorm\.", "embedding LayerNorm"),
]


def untrained(branch: nn.Module, filled: set[str]) -> list[str]:
    """The parts of a branch that no source filled, named as a reader of the model card knows them."""
    names: list[str] = []
    for name in branch.state_dict():
        if name in filled:
            continue
        part = next((label for pattern, label in _PARTS if re.search(pattern, name)), name)
        if part not in names:
            names.append(part)
    return names


# -- compose --------------------------------------------------------------------------------


def _config_kwargs(hf_config: Any, config_class: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    keep = set(config_class().to_dict()) - {"transformers_version", "model_type", "architectures", *drop}
    return {k: v for k, v in hf_config.to_dict().items() if k in keep}


def compose(*, out: Path, log: Log = print, **parts: Any) -> str:
    """Write a checkpoint to ``out`` (``parts``: :func:`build`'s arguments); returns the weights' sha256."""
    model, tokenizers, provenance = build(log=log, **parts)
    written = out.with_name(out.name + ".composing")
    sha = save(model, tokenizers, written, provenance)
    swap_in(written, out)
    log(f"wrote {out} (weights sha256 {sha})")
    return sha


def build(
    *,
    blip2: str,
    sam: str | None,
    model_type: str = "msmedcap",
    bert: str = "bert-base-uncased",
    blip2_itm: str | None = None,
    sam_layout: str = "channel",
    prompt: str = "",
    name: str = "",
    eval_image_size: int | None = None,
    frozen_dtype: torch.dtype | None = None,
    seed: int = 0,
    log: Log = print,
) -> tuple[MedCapModel, Tokenizers, Provenance]:
    """The model composed from its parts, its tokenizers and provenance (nothing written).

    ``eval_image_size``: the CLIP view when captioning (None: 364 if the ViT was trained at 224,
    as in the paper, else its training size). ``frozen_dtype``: keep the frozen encoders and the
    LM in this dtype (None: as their source stores them).
    """
    from transformers import AutoTokenizer, BertConfig, Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    if model_type not in MODEL_TYPES:
        raise ComposeError(f"--model-type: {model_type!r} is not one of {sorted(MODEL_TYPES)}")
    branches = MODEL_TYPES[model_type]
    if "sam" in branches and not sam:
        raise ComposeError(f"--sam is required for {model_type}")
    if blip2_itm and "clip" not in branches:
        raise ComposeError(f"--blip2-itm: {model_type} has no CLIP branch")
    torch.manual_seed(seed)  # the new parts: the same sources give the same checkpoint
    blip_dir, bert_dir = resolve(blip2, "--blip2"), resolve(bert, "--bert")
    try:
        blip_config = Blip2Config.from_pretrained(blip_dir)
        bert_config = BertConfig.from_pretrained(bert_dir)
    except (OSError, ValueError) as exc:
        raise ComposeError(f"cannot read a config: {exc}") from None
    blip_files, bert_files = TensorFiles(blip_dir), TensorFiles(bert_dir)
    provenance = Provenance(
        sources=[
            {"part": "CLIP ViT (EVA), CLIP Q-Former query path, queries, projection, OPT", "source": blip2, "sha256": source_sha(blip_dir)},
            {
                "part": "Q-Former tokenizer; Q-Former text sides (embeddings, text feed-forward, ITG head); SAM Q-Former self-attention and "
                "feed-forward",
                "source": bert,
                "sha256": source_sha(bert_dir),
            },
        ]
    )
    sam_kwargs, sam_weights, gaussian = None, None, None
    if "sam" in branches:
        sam_path = resolve(sam, "--sam")  # type: ignore[arg-type]
        log(f"reading SAM from {sam}")
        sam_kwargs, sam_weights, gaussian = load_sam(sam_path)
        provenance.sources.append({"part": "SAM image encoder", "source": sam, "sha256": source_sha(sam_path)})
        if gaussian is None and sam_layout == "spatial":
            raise ComposeError(
                f"--sam {sam}: no positional encoding matrix ({SAM_PE_KEY_HF} or {SAM_PE_KEY_PTH}), which the spatial "
                "layout adds to every token: give a full SAM checkpoint (SamModel), or use --sam-layout channel"
            )

    lm_tok = AutoTokenizer.from_pretrained(blip_dir)
    q_tok = AutoTokenizer.from_pretrained(bert_dir)
    if QFORMER_BOS not in q_tok.get_vocab():
        q_tok.add_special_tokens({"bos_token": QFORMER_BOS})
    qformer_kwargs = _config_kwargs(blip_config.qformer_config, Blip2QFormerConfig, ("encoder_hidden_size", "use_qformer_text_input"))
    for field_name, bert_field in (
        ("hidden_size", "hidden_size"),
        ("num_hidden_layers", "num_hidden_layers"),
        ("num_attention_heads", "num_attention_heads"),
        ("intermediate_size", "intermediate_size"),
    ):
        if qformer_kwargs[field_name] != getattr(bert_config, bert_field):
            raise ComposeError(
                f"--bert {bert}: {bert_field} is {getattr(bert_config, bert_field)}, the BLIP-2 Q-Former's is "
                f"{qformer_kwargs[field_name]}: not the BERT the Q-Former was made from"
            )
    vision: Any = blip_config.vision_config
    clip_size = int(vision.image_size)
    itc_dim = 256  # LAVIS' embed_dim; BLIP-2's stage 1 says its own
    if blip2_itm:
        try:
            itc_dim = int(Blip2Config.from_pretrained(resolve(blip2_itm, "--blip2-itm")).image_text_hidden_size)
        except (OSError, ValueError) as exc:
            raise ComposeError(f"--blip2-itm {blip2_itm}: cannot read its config ({exc})") from None
    config = MedCapConfig(
        model_type=model_type,
        clip_vision=_config_kwargs(blip_config.vision_config, Blip2VisionConfig) if "clip" in branches else None,
        sam_vision=sam_kwargs,
        qformer=qformer_kwargs | {"vocab_size": len(q_tok)},
        lm=_config_kwargs(blip_config.text_config, OPTConfig),
        num_query_tokens=blip_config.num_query_tokens,
        sam_layout=sam_layout,
        clip_image_size=clip_size,
        itc_dim=itc_dim,
        eval_clip_image_size=eval_image_size or (PAPER_EVAL_IMAGE_SIZE if clip_size == 224 else None),
        sam_image_size=int(sam_kwargs["image_size"]) if sam_kwargs else 1024,
        prompt=prompt,
        name=name,
    )

    log(f"building {config.display_name} (pretrained parts without memory; the Q-Formers for real)")
    with weights.empty_weights():
        model = MedCapModel(config)
    for branch in branches:
        model.branches[branch] = model.new_branch(branch)
    try:
        log(f"reading OPT from {blip2}")
        weights.assign(model.lm, blip_files.take(prefixed("language_model."), frozen_dtype), what="--blip2: OPT language model")
        if "clip" in branches:
            log(f"reading the EVA ViT and the CLIP Q-Former from {blip2}")
            clip: Any = model.encoders["clip"]
            weights.assign(clip.model, blip_files.take(prefixed("vision_model."), frozen_dtype), what="--blip2: CLIP vision encoder")
            _compose_clip_branch(model, blip_files, bert_files, blip2_itm, provenance, log)
        if "sam" in branches:
            encoder: Any = model.encoders["sam"]
            sam_state = {f"model.{k}": v.to(frozen_dtype) if frozen_dtype else v for k, v in sam_weights.items()}  # type: ignore[union-attr]
            sam_state["positional_gaussian"] = gaussian.float() if gaussian is not None else torch.zeros(2, encoder.channels // 2)
            weights.assign(encoder, sam_state, what="--sam: SAM image encoder")
            if gaussian is None:
                provenance.initialised.append(
                    "SAM positional encoding matrix: zeros, absent from the source (unused by the channel layout)"
                )
            filled = fill(model.branches["sam"], bert_into_branch(bert_files, query_path=True, text_side=True), "--bert: SAM Q-Former")
            provenance.initialised.append(f"SAM Q-Former: {', '.join(untrained(model.branches['sam'], filled))} (train stage 1, then 2)")
    except weights.WeightsError as exc:
        raise ComposeError(str(exc)) from None
    left = weights.meta_names(model)
    if left:
        raise ComposeError(f"{len(left)} weight(s) have no source, e.g. {left[:5]}")
    if "clip" not in branches:
        provenance.initialised.append("no CLIP branch (SAM-BLIP2)")
    return model, Tokenizers(lm_tok, q_tok), provenance


def _compose_clip_branch(
    model: MedCapModel, blip_files: TensorFiles, bert_files: TensorFiles, blip2_itm: str | None, provenance: Provenance, log: Log
) -> None:
    """The CLIP branch: BLIP-2's query path, queries and projection; its text side from BERT or BLIP-2's stage 1."""
    branch = model.branches["clip"]
    query_path = blip_files.take(prefixed("qformer."), torch.float32)
    for key in ("query_tokens", "language_projection.weight", "language_projection.bias"):
        query_path[key] = blip_files.get(key, torch.float32)
    filled = fill(
        branch,
        {f"qformer.{k}" if not k.startswith(("query_tokens", "language_projection")) else k: v for k, v in query_path.items()},
        "--blip2: CLIP Q-Former",
    )
    if model.config.qformer_text:
        filled |= fill(branch, bert_into_branch(bert_files, query_path=False, text_side=True), "--bert: CLIP Q-Former text side")
        if blip2_itm:
            itm_dir = resolve(blip2_itm, "--blip2-itm")
            log(f"reading the CLIP Q-Former's stage-1 text side from {blip2_itm}")
            itm = TensorFiles(itm_dir)
            renames = {
                "vision_projection.": "vision_proj.",
                "text_projection.": "text_proj.",
                "itm_head.": "itm_head.",
                "embeddings.": "embeddings.",
            }

            def stage1_name(key: str) -> str | None:
                if re.match(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.", key):
                    return key
                return next((new + key[len(old) :] for old, new in renames.items() if key.startswith(old)), None)

            stage1 = itm.take(stage1_name, torch.float32)
            if not any(k.startswith("vision_proj.") for k in stage1):
                raise ComposeError(f"--blip2-itm {blip2_itm}: no vision_projection.* weights: not a Blip2ForImageTextRetrieval checkpoint")
            filled |= fill(branch, stage1, "--blip2-itm: CLIP Q-Former text side")
            provenance.sources.append(
                {"part": "CLIP Q-Former text side and ITC/ITM heads (BLIP-2 stage 1)", "source": blip2_itm, "sha256": source_sha(itm_dir)}
            )
    provenance.initialised.append(f"CLIP Q-Former: {', '.join(untrained(branch, filled)) or 'nothing'} (stage 1 trains them)")
