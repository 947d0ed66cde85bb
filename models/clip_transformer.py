"""CLIP-Transformer: the CLIP-ViL idea (Shen et al. 2021) — frozen CLIP ViT grid features feed a transformer captioner.

Every output token of the frozen CLIP vision transformer (class token and patches, before the
final layer norm) is projected to ``d_model`` (Linear + LayerNorm); a small pre-norm transformer
decoder (causal self-attention over the words, cross-attention to the image tokens, learned
positions) predicts the next word of a word vocabulary (models/word_vocab.py). Teacher forcing
with cross-entropy over real tokens in training; greedy or beam search at inference (models/beam.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig

from models.beam import evaluating, search
from models.clip_parts import ClipImageEncoder, tiny_clip_vision_config
from models.config import ClipViewConfig, ConfigError
from models.families import ComposeRequest, Family
from models.generation import GenerationPreset
from models.word_vocab import EOS, PAD, SOS, WordVocab, check_vocabulary_fields, vocabulary_source

FORMAT_VERSION = 1


@dataclass
class ClipTransformerConfig(ClipViewConfig):
    #: Words in the vocabulary, the four specials included (``len(WordVocab)``).
    vocab_size: int
    #: ``transformers.CLIPVisionConfig`` arguments, ``projection_dim`` included.
    clip_vision: dict[str, Any]
    d_model: int = 512
    num_layers: int = 3
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    #: Decoder positions: the longest caption, ``<SOS>`` and ``<EOS>`` included (longer ones lose their last words).
    max_caption_tokens: int = 52
    #: How often a word had to occur in the training captions to enter the vocabulary.
    min_word_count: int = 5
    model_type: str = "clip_transformer"
    version: str = "0.1.0"
    name: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.require_model_type("clip_transformer")
        self.require_positive("vocab_size", "d_model", "num_layers", "num_heads", "ffn_dim", "max_caption_tokens", "min_word_count")
        check_vocabulary_fields(self.vocab_size, self.max_caption_tokens)
        if self.d_model % self.num_heads:
            raise ConfigError(f"num_heads: {self.num_heads} does not divide d_model {self.d_model}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout!r}")
        self.require_arguments("clip_vision", CLIPVisionConfig)
        self.require_format(FORMAT_VERSION)

    @property
    def display_name(self) -> str:
        return self.name or "CLIP-Transformer"

    def summary(self) -> list[str]:
        vision = self.clip_vision
        return [
            f"- model type: `clip_transformer` ({self.display_name}), version {self.version}",
            f"- encoder: CLIP ViT (width {vision.get('hidden_size', 768)}, patch {vision.get('patch_size', 32)}, "
            f"{self.view_size} px), frozen; every output token is an image token",
            f"- decoder: transformer, {self.num_layers} layers, d_model {self.d_model}, {self.num_heads} heads, "
            f"feed-forward {self.ffn_dim}, dropout {self.dropout}, {self.max_caption_tokens} positions",
            f"- vocabulary: {self.vocab_size} words incl. 4 specials (words seen at least {self.min_word_count} times)",
        ]


class ClipTransformerModel(nn.Module):
    def __init__(self, config: ClipTransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ClipImageEncoder(config.clip_vision)  # frozen by ClipImageEncoder
        d = config.d_model
        self.visual = nn.Sequential(nn.Linear(self.encoder.width, d), nn.LayerNorm(d))
        self.embed = nn.Embedding(config.vocab_size, d, padding_idx=PAD)
        self.positions = nn.Embedding(config.max_caption_tokens, d)
        layer = nn.TransformerDecoderLayer(
            d, config.num_heads, config.ffn_dim, config.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, config.num_layers, norm=nn.LayerNorm(d))
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(d, config.vocab_size)
        # GPT-2's embedding scale: N(0, 1) embeddings would swamp the pre-norm residual stream at first.
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[PAD].zero_()

    # -- images ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, pixels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"patches": (B, 1 + patches, CLIP width)} in the encoder's dtype."""
        if "clip" not in pixels:
            raise ValueError(f"pixels: {self.config.display_name} reads the 'clip' view, got {sorted(pixels)}")
        return {"patches": self.encoder(pixels["clip"])["patches"]}

    def _memory(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, tokens, d_model) fp32: the trainable part starts here, whatever dtype the encoder ran in."""
        return self.visual(features["patches"].to(device=self.head.weight.device, dtype=self.head.weight.dtype))

    def _logits(self, memory: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        x = self.dropout(self.embed(ids) + self.positions.weight[:length])
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device, dtype=x.dtype)
        return self.head(self.decoder(x, memory, tgt_mask=mask, tgt_is_causal=True))

    def _check(self, text: WordVocab) -> None:
        if len(text) != self.config.vocab_size:
            raise ValueError(f"vocabulary: {len(text)} words, but {self.config.display_name} was built for {self.config.vocab_size}")

    # -- training --------------------------------------------------------------------------------

    def caption_loss(self, features: dict[str, torch.Tensor], captions: Sequence[str], text: WordVocab) -> torch.Tensor:
        """Mean cross-entropy per target token (words and ``<EOS>``) over the batch."""
        self._check(text)
        if features["patches"].shape[0] != len(captions):
            raise ValueError(f"captions: {len(captions)} for {features['patches'].shape[0]} images")
        ids, _ = text.encode_batch(captions, self.config.max_caption_tokens)
        ids = ids.to(self.head.weight.device)
        # Causal attention: a real token never sees the padding after it, and padded targets are ignored.
        logits = self._logits(self._memory(features), ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=PAD)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("encoder.")]

    # -- inference -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_captions(self, features: dict[str, torch.Tensor], text: WordVocab, preset: GenerationPreset) -> list[str]:
        self._check(text)
        with evaluating(self):
            memory = self._memory(features)

            # No key/value cache: captions are short and the decoder is small.
            def step(tokens: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
                return F.log_softmax(self._logits(state[0], tokens)[:, -1].float(), dim=-1), state

            ids = search(
                step,
                (memory,),
                memory.shape[0],
                preset,
                sos=SOS,
                eos=EOS,
                banned=(PAD, SOS),
                max_new_tokens=self.config.max_caption_tokens - 1,
            )
        return [text.decode(row) for row in ids]

    def place(self, device: torch.device, dtype: torch.dtype | None) -> None:
        """Move to ``device``; the CLIP ViT in ``dtype``, the projection and decoder stay fp32."""
        self.to(device)
        if dtype is not None and dtype != torch.float32:
            self.encoder.to(dtype)


# -- construction ------------------------------------------------------------------------------


def tiny_clip_transformer(
    captions: Sequence[str], *, image_size: int = 64, width: int = 32, seed: int = 0, **overrides: Any
) -> tuple[ClipTransformerModel, WordVocab]:
    """A random tiny CLIP-Transformer and a vocabulary of every word in ``captions``; CPU-fast (tests, synthetic benchmark)."""
    min_count = int(overrides.pop("min_word_count", 1))
    vocab = WordVocab.build(captions, min_count)
    values: dict[str, Any] = (
        dict(d_model=width, num_layers=2, num_heads=max(1, width // 16), ffn_dim=2 * width, dropout=0.0, max_caption_tokens=48) | overrides
    )
    config = ClipTransformerConfig(
        vocab_size=len(vocab), clip_vision=tiny_clip_vision_config(image_size, width), min_word_count=min_count, **values
    )
    torch.manual_seed(seed)
    return ClipTransformerModel(config), vocab


def compose_clip_transformer(
    out: Path,
    *,
    clip: str,
    captions: Sequence[str],
    min_word_count: int = 5,
    name: str = "",
    log: Callable[[str], None] = print,
    **overrides: Any,
) -> Path:
    """A CLIP-Transformer checkpoint from a pretrained CLIP (``openai/clip-vit-large-patch14``, any CLIPModel, local or
    hub) and a vocabulary of ``captions``; projection and decoder start untrained."""
    from models.checkpoint import Provenance, save
    from models.clip_parts import load_clip, tower_from
    from models.sources import resolve, source_sha

    log(f"loading CLIP from {clip}")
    vision, weights = tower_from(load_clip(clip, "--clip"), "vision")
    vocab = WordVocab.build(captions, min_word_count)
    log(f"vocabulary: {len(vocab.words)} words seen at least {min_word_count} times in {len(captions)} captions")
    config = ClipTransformerConfig(vocab_size=len(vocab), clip_vision=vision, min_word_count=min_word_count, name=name, **overrides)
    log(f"building {config.display_name}")
    model = ClipTransformerModel(config)
    model.encoder.model.load_state_dict(weights, strict=True)
    provenance = Provenance(
        sources=[
            {"part": "CLIP ViT (vision tower)", "source": clip, "sha256": source_sha(resolve(clip, "--clip"))},
            vocabulary_source(captions, min_word_count),
        ],
        initialised=[
            "image token projection (Linear + LayerNorm), transformer decoder, word and position embeddings, output layer "
            "(train them: medcap train caption)"
        ],
    )
    sha = save(model, vocab, out, provenance)
    log(f"wrote {out} (weights sha256 {sha})")
    return out


def _compose(request: ComposeRequest) -> Path:
    o = request.options
    return compose_clip_transformer(
        request.out, clip=o["clip"], captions=request.captions, min_word_count=o["min_word_count"], name=request.name, log=request.log
    )


FAMILY = Family(
    config=ClipTransformerConfig,
    model=ClipTransformerModel,
    text=WordVocab,
    description="CLIP-Transformer: frozen CLIP ViT grid features -> transformer decoder over words (the CLIP-ViL idea, Shen et al. 2021)",
    # A from-scratch transformer captioner: AdamW at 1e-4 (weight decay 0.01), a short linear warm-up
    # (100 steps: a fraction of an epoch even on small sets) and clipping at 1.0 keep the untrained
    # decoder's first steps stable; batch 32; early stopping on validation loss as the CNN-LSTM,
    # since small radiology sets overfit within a few epochs.
    fit_defaults={
        "epochs": 30,
        "batch_size": 32,
        "lr": 1e-4,
        "optimizer": "adamw",
        "weight_decay": 0.01,
        "grad_clip": 1.0,
        "patience": 2,
        "warmup_steps": 100,
    },
    compose=_compose,
)
