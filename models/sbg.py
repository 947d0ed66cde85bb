"""SBG, Huynh et al.'s "blind" caption generator ("CLIP-Prefix for Image Captioning and an Experiment
on Blind Image Guessing"): GPT-2 writes the caption without ever seeing the image.

1. CLIP scores a keyword vocabulary (frequent content words of the training captions) against the
   image: cosine of the image embedding and each keyword's text embedding.
2. GPT-2 gets only the top keywords, as text ("keywords: a, b, c. caption:"), and writes N candidate
   captions by beam search.
3. The image embedding reranks them: CLIP's image-caption similarity picks one. N = 1, 2, 5 are
   the paper's "one", "top-2" and "top-5" settings (``GenerationPreset.candidates``).

Training: GPT-2's LM loss on keyword prompt -> caption, the prompt holding the caption's own
keywords shuffled and some dropped (it must write from imperfect keywords). Our CLIP may be
untrained or off-domain, so by default (``train_clip``) the text tower, an image-side linear
adapter (identity at first: a pretrained CLIP's zero-shot scores are kept) and the logit scales
train too: symmetric image-caption InfoNCE for reranking, per-keyword BCE for keyword scoring
(SigLIP-style scale and bias, so the scores are probabilities and ``keyword_threshold`` can drop
keywords the image does not support). The vision tower is always frozen.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from models.captions import pre_caption, word_tokens
from models.clip_parts import ClipImageEncoder, ClipTextEncoder, tiny_clip_vision_config
from models.config import ClipViewConfig, ConfigError
from models.families import ComposeRequest, Family
from models.frozen import freeze
from models.generation import GenerationPreset
from models.gpt2_text import (
    CLIP_FOLDER,
    ClipTokens,
    Gpt2Text,
    build_small_clip_tokenizer,
    build_small_gpt2_tokenizer,
    check_clip_eos,
    config_kwargs,
    generation_kwargs,
    load_gpt2,
    load_tokenizer,
    tiny_clip_text_config,
    tiny_gpt2_config,
)

FORMAT_VERSION = 1
PROMPT = "keywords: {}. caption:"
CLIP_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps its scale here
#: English function words. Negations are kept out on purpose: "no" is a finding in radiology.
STOPWORDS = frozenset(
    "a an the and or but if then than of in on at to for from by with as into onto over under about above below between "
    "through during before after is are was were be been being am do does did has have had having it its this that these "
    "those there here which who whom whose what when where why how all any both each few more most other some such own "
    "same so too very can will just should would could may might must shall also only i me my we our you your he him his "
    "she her they them their s t".split()
)


def build_keywords(captions: Iterable[str], max_keywords: int = 300, min_count: int = 2) -> list[str]:
    """The most frequent content words of ``captions`` (in how many captions each occurs), most frequent first."""
    if max_keywords < 1 or min_count < 1:
        raise ValueError("max_keywords and min_count must be at least 1")
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update({w for w in word_tokens(pre_caption(caption)) if _content_word(w)})
    ranked = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    return ranked[:max_keywords]


def keyword_bias(captions: Sequence[str], keywords: Sequence[str]) -> float:
    """Log-odds that a vocabulary keyword occurs in a caption, on average over ``captions``."""
    if not captions or not keywords:
        return -4.0
    share = sum(len(caption_keywords(c, keywords)) for c in captions) / (len(captions) * len(keywords))
    share = min(max(share, 1e-4), 0.5)
    return math.log(share / (1 - share))


def _content_word(word: str) -> bool:
    return len(word) > 1 and word not in STOPWORDS and not word.isdigit()


def caption_keywords(caption: str, vocabulary: Iterable[str]) -> list[str]:
    """The vocabulary keywords a caption contains, once each, in caption order."""
    known = set(vocabulary)
    return list(dict.fromkeys(w for w in word_tokens(pre_caption(caption)) if w in known))


@dataclass
class SbgConfig(ClipViewConfig):
    #: ``transformers.CLIPVisionConfig`` / ``CLIPTextConfig`` arguments, ``projection_dim`` included.
    clip_vision: dict[str, Any]
    clip_text: dict[str, Any]
    #: ``transformers.GPT2Config`` arguments.
    gpt2: dict[str, Any]
    #: The keyword vocabulary CLIP scores (``build_keywords`` on the training captions).
    keywords: list[str]
    #: Keywords given to GPT-2 at most (the best scoring ones).
    top_k: int = 10
    #: With ``train_clip``: keywords scoring below this probability are left out (at least one is kept).
    #: None: always the top_k (zero-shot CLIP, where scores are not probabilities).
    keyword_threshold: float | None = 0.5
    #: Candidate captions reranked by CLIP when the generation preset names none.
    candidates: int = 5
    train_clip: bool = True
    #: Training: the chance of leaving out each of a caption's keywords from its prompt.
    keyword_dropout: float = 0.15
    #: Training: captions with one keyword swapped for another, as extra InfoNCE negatives per caption.
    #: GPT-2's candidates differ from each other in a few keywords, so that is what reranking must tell apart.
    hard_negatives: int = 1
    contrastive_weight: float = 1.0
    keyword_weight: float = 1.0
    #: Initial log of the image-caption logit scale (compose copies the pretrained CLIP's).
    logit_scale_init: float = CLIP_LOGIT_SCALE
    #: Initial keyword score bias: the log-odds of a keyword being in a caption (``keyword_bias``), so
    #: that scores start calibrated; scalars barely move at fine-tuning learning rates.
    keyword_bias_init: float = -4.0
    max_caption_tokens: int = 64
    model_type: str = "sbg"
    version: str = "0.1.0"
    name: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.require_model_type("sbg")
        for name in ("clip_vision", "clip_text", "gpt2"):
            self.require_arguments(name)
        if not isinstance(self.keywords, list) or not self.keywords or not all(isinstance(k, str) and k.strip() for k in self.keywords):
            raise ConfigError("keywords: must be a non-empty list of words (build_keywords on the training captions)")
        if len(set(self.keywords)) != len(self.keywords):
            raise ConfigError("keywords: contains duplicates")
        self.require_positive("top_k", "candidates", "max_caption_tokens")
        if self.keyword_threshold is not None and not 0 < self.keyword_threshold < 1:
            raise ConfigError(f"keyword_threshold: must lie between 0 and 1 (or null), got {self.keyword_threshold!r}")
        if isinstance(self.hard_negatives, bool) or not isinstance(self.hard_negatives, int) or self.hard_negatives < 0:
            raise ConfigError(f"hard_negatives: must be a whole number, at least 0, got {self.hard_negatives!r}")
        if not 0 <= self.keyword_dropout < 1:
            raise ConfigError(f"keyword_dropout: must lie in [0, 1), got {self.keyword_dropout!r}")
        for name in ("contrastive_weight", "keyword_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}: must not be negative, got {getattr(self, name)!r}")
        if not math.isfinite(self.keyword_bias_init) or not math.isfinite(self.logit_scale_init):
            raise ConfigError("keyword_bias_init/logit_scale_init: must be finite numbers")
        if not isinstance(self.train_clip, bool):
            raise ConfigError(f"train_clip: must be true or false, got {self.train_clip!r}")
        if int(self.clip_vision.get("projection_dim", 512)) != int(self.clip_text.get("projection_dim", 512)):
            raise ConfigError("clip_text: projection_dim differs from clip_vision's: not one CLIP model")
        if self.prompt_tokens < 16:
            raise ConfigError(f"max_caption_tokens: {self.max_caption_tokens} leaves under 16 of GPT-2's positions for the keyword prompt")
        self.require_format(FORMAT_VERSION)

    @property
    def display_name(self) -> str:
        return self.name or "SBG"

    @property
    def reranks(self) -> bool:
        """It picks among candidate captions (``GenerationPreset.candidates``): evaluation scores each count."""
        return True

    @property
    def prompt_tokens(self) -> int:
        """GPT-2 positions left for the keyword prompt."""
        return int(GPT2Config(**self.gpt2).n_positions) - self.max_caption_tokens

    @property
    def clip_text_tokens(self) -> int:
        return int(CLIPTextConfig(**self.clip_text).max_position_embeddings)

    def summary(self) -> list[str]:
        threshold = f", those below p = {self.keyword_threshold} left out" if self.keyword_threshold is not None and self.train_clip else ""
        return [
            f"- model type: `sbg` ({self.display_name}), version {self.version}",
            f"- {len(self.keywords)} keywords scored by CLIP; GPT-2 writes from the top {self.top_k}{threshold}, never seeing the image",
            f"- {self.candidates} candidate caption(s) reranked by CLIP image-caption similarity by default",
            f"- CLIP ViT frozen; CLIP text tower {'trained (InfoNCE + keyword BCE)' if self.train_clip else 'frozen'}; GPT-2 fine-tuned",
        ]


@dataclass
class SbgText:
    """GPT-2's tokenizer (``gpt2_tokenizer/``) and CLIP's (``clip_tokenizer/``)."""

    gpt2: Gpt2Text
    clip: PreTrainedTokenizerBase

    def save(self, directory: Path) -> None:
        self.gpt2.save(directory)
        self.clip.save_pretrained(Path(directory) / CLIP_FOLDER)

    @classmethod
    def load(cls, directory: Path) -> SbgText:
        return cls(Gpt2Text.load(directory), load_tokenizer(directory, CLIP_FOLDER))


class SbgModel(nn.Module):
    def __init__(self, config: SbgConfig) -> None:
        super().__init__()
        self.config = config
        self._keywords: torch.Tensor | None = None  # keyword embeddings cached at inference (keyword_embeddings)
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "_keywords", None))
        self.clip = ClipImageEncoder(config.clip_vision)  # frozen by construction
        self.clip_text = ClipTextEncoder(config.clip_text)
        self.lm: Any = GPT2LMHeadModel(GPT2Config(**config.gpt2))  # Any: transformers types generate() for another self
        dim = self.clip.embedding_dim
        self.image_adapter = nn.Linear(dim, dim)
        with torch.no_grad():
            self.image_adapter.weight.copy_(torch.eye(dim))
            self.image_adapter.bias.zero_()
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        # Calibrated keyword probabilities need a scale and a bias (SigLIP's scale; the bias at the prior).
        self.keyword_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.keyword_bias = nn.Parameter(torch.tensor(float(config.keyword_bias_init)))
        if not config.train_clip:
            freeze(self.clip_text)
            for p in self.clip_side_parameters():
                p.requires_grad_(False)

    def clip_side_parameters(self) -> list[nn.Parameter]:
        return [*self.image_adapter.parameters(), self.logit_scale, self.keyword_scale, self.keyword_bias]

    # -- CLIP ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, pixels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "clip" not in pixels:
            raise ValueError(f"pixels: {self.config.display_name} reads the clip view, got {sorted(pixels)}")
        return {"embedding": self.clip(pixels["clip"])["embedding"].float()}

    def image_embedding(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, D) unit vectors: the frozen CLIP embedding through the (trainable) adapter, fp32."""
        embedding = features["embedding"].to(device=self.image_adapter.weight.device, dtype=torch.float32)
        return F.normalize(self.image_adapter(embedding), dim=-1)

    def text_embedding(self, texts: Sequence[str], text: SbgText) -> torch.Tensor:
        """(N, D) unit vectors of CLIP's text tower, fp32 whatever the tower's dtype."""
        device = self.image_adapter.weight.device
        return F.normalize(self.clip_text(**ClipTokens(text.clip, self.config.clip_text_tokens)(texts, device)).float(), dim=-1)

    def keyword_logits(self, image: torch.Tensor, text: SbgText) -> torch.Tensor:
        """(B, K) keyword scores from unit image embeddings: scaled cosine plus bias (sigmoid: probability)."""
        return self.keyword_scale.exp() * image @ self.keyword_embeddings(text).T + self.keyword_bias

    def keyword_embeddings(self, text: SbgText) -> torch.Tensor:
        """(K, D) text embeddings of the keyword vocabulary. Fixed at inference, so computed once per
        placement rather than once per batch (hundreds of keywords through the text tower)."""
        if self.training or torch.is_grad_enabled():
            return self.text_embedding(self.config.keywords, text)
        if self._keywords is None:
            self._keywords = self.text_embedding(self.config.keywords, text)
        return self._keywords

    def train(self, mode: bool = True) -> SbgModel:
        self._keywords = None  # weights may change from here on
        return super().train(mode)

    def select_keywords(self, logits: torch.Tensor) -> list[list[str]]:
        """The top_k keywords per image, best first; with a trained CLIP those below the threshold are dropped."""
        k = min(self.config.top_k, logits.shape[1])
        scores, index = logits.topk(k, dim=1)
        threshold = self.config.keyword_threshold if self.config.train_clip else None
        chosen = []
        for row_scores, row_index in zip(scores.tolist(), index.tolist(), strict=True):
            keep = [i for s, i in zip(row_scores, row_index, strict=True) if threshold is None or 1 / (1 + math.exp(-s)) >= threshold]
            chosen.append([self.config.keywords[i] for i in (keep or row_index[:1])])
        return chosen

    def candidate_scores(self, features: dict[str, torch.Tensor], candidates: Sequence[Sequence[str]], text: SbgText) -> torch.Tensor:
        """(B, N) cosine similarity of each image with each of its N candidate captions."""
        image = self.image_embedding(features)
        width = len(candidates[0])
        if any(len(c) != width for c in candidates):
            raise ValueError("candidates: every image needs the same number of candidates")
        captions = self.text_embedding([c for row in candidates for c in row], text).view(len(candidates), width, -1)
        return torch.einsum("bd,bnd->bn", image, captions)

    @torch.no_grad()
    def rerank(self, features: dict[str, torch.Tensor], candidates: Sequence[Sequence[str]], text: SbgText) -> list[str]:
        """Per image, the candidate CLIP finds most similar to it (the earlier, higher-beam one on a tie)."""
        best = self.candidate_scores(features, candidates, text).argmax(dim=1).tolist()
        return [row[i] for row, i in zip(candidates, best, strict=True)]

    # -- GPT-2 -----------------------------------------------------------------------------

    @staticmethod
    def prompt(keywords: Sequence[str]) -> str:
        return PROMPT.format(", ".join(keywords))

    def prompt_ids(self, keywords: Sequence[str], text: SbgText) -> list[int]:
        """GPT-2 ids of the prompt of at most top_k keywords, the last ones dropped if it would not fit."""
        keywords = list(keywords[: self.config.top_k])
        ids = text.gpt2.ids(self.prompt(keywords))
        while len(ids) > self.config.prompt_tokens and len(keywords) > 1:
            keywords.pop()
            ids = text.gpt2.ids(self.prompt(keywords))
        return ids

    @torch.no_grad()
    def write(self, keywords: Sequence[Sequence[str]], text: SbgText, preset: GenerationPreset, n: int = 1) -> list[list[str]]:
        """GPT-2 alone: ``n`` captions (best beam first) per keyword list. Nothing of the image goes in."""
        batch = text.gpt2.prompt_batch([self.prompt_ids(k, text) for k in keywords])
        device = self.lm.get_input_embeddings().weight.device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        beams = max(preset.num_beams, n)
        out = self.lm.generate(input_ids=ids, attention_mask=mask, num_return_sequences=n, **generation_kwargs(text.gpt2, preset, beams))
        texts = text.gpt2.decode_batch(out[:, ids.shape[1] :])  # generate echoes input ids: keep the new tokens
        return [texts[i * n : (i + 1) * n] for i in range(len(keywords))]

    # -- the CaptionModel interface -----------------------------------------------------------

    def caption_loss(self, features: dict[str, torch.Tensor], captions: Sequence[str], text: SbgText) -> torch.Tensor:
        own = [caption_keywords(c, self.config.keywords) for c in captions]
        prompts = [self.prompt_ids(self._noisy(k) if self.training else k, text) for k in own]
        device = self.lm.get_input_embeddings().weight.device
        batch = {k: v.to(device) for k, v in text.gpt2.prompted_batch(prompts, captions, self.config.max_caption_tokens).items()}
        loss = self.lm(**batch).loss.float()
        if not self.config.train_clip:
            return loss
        image = self.image_embedding(features)
        normalised = [pre_caption(c) for c in captions]
        negatives = [n for c, k in zip(normalised, own, strict=True) for n in self._swapped(c, k)] if self.training else []
        # Identical captions in a batch are all positives of each other; a swapped caption never is.
        same = torch.tensor([[a == b for b in normalised] for a in normalised], dtype=torch.float32, device=image.device)
        targets = same / same.sum(dim=1, keepdim=True)
        texts = self.text_embedding([*normalised, *negatives], text)
        logits = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * image @ texts.T
        n = len(captions)
        image_to_text = F.cross_entropy(logits, F.pad(targets, (0, len(negatives))))
        contrastive = (image_to_text + F.cross_entropy(logits[:, :n].T, targets.T)) / 2
        present = torch.zeros(len(captions), len(self.config.keywords), device=image.device)
        index = {k: i for i, k in enumerate(self.config.keywords)}
        for row, words in enumerate(own):
            present[row, [index[w] for w in words]] = 1.0
        keyword = F.binary_cross_entropy_with_logits(self.keyword_logits(image, text), present)
        return loss + self.config.contrastive_weight * contrastive + self.config.keyword_weight * keyword

    def _swapped(self, caption: str, keywords: list[str]) -> list[str]:
        """``hard_negatives`` copies of a (normalised) caption, each with one of its keywords replaced by another."""
        vocabulary = self.config.keywords
        if not keywords or len(vocabulary) < 2:
            return []
        out = []
        for _ in range(self.config.hard_negatives):
            old = keywords[int(torch.randint(len(keywords), ()))]
            new = vocabulary[int(torch.randint(len(vocabulary) - 1, ()))]
            new = vocabulary[-1] if new == old else new  # uniform over the other keywords
            out.append(" ".join(new if w == old else w for w in caption.split(" ")))
        return out

    def _noisy(self, keywords: list[str]) -> list[str]:
        """Shuffled, each dropped with ``keyword_dropout`` (one kept): what imperfect keyword scores give.

        (More than top_k keywords: ``prompt_ids`` keeps the first top_k, a random subset.)
        """
        if not keywords:
            return keywords
        kept = [keywords[i] for i in torch.randperm(len(keywords)).tolist() if float(torch.rand(())) >= self.config.keyword_dropout]
        return kept or [keywords[int(torch.randint(len(keywords), ()))]]

    @torch.no_grad()
    def generate_captions(self, features: dict[str, torch.Tensor], text: SbgText, preset: GenerationPreset) -> list[str]:
        was_training = self.training
        self.eval()
        try:
            keywords = self.select_keywords(self.keyword_logits(self.image_embedding(features), text))
            n = preset.candidates if preset.candidates is not None else self.config.candidates
            candidates = self.write(keywords, text, preset, n)
            return [row[0] for row in candidates] if n == 1 else self.rerank(features, candidates, text)
        finally:
            self.train(was_training)

    def trainable_parameters(self) -> list[nn.Parameter]:
        clip = [*self.clip_text.parameters(), *self.clip_side_parameters()] if self.config.train_clip else []
        return list(self.lm.parameters()) + clip

    def place(self, device: torch.device, dtype: torch.dtype | None) -> None:
        """The vision tower (and a frozen text tower) in ``dtype``; GPT-2 and everything trained stay fp32."""
        self._keywords = None
        self.to(device)
        if dtype is not None and dtype != torch.float32:
            self.clip.to(dtype)
            if not self.config.train_clip:
                self.clip_text.to(dtype)


def tiny_sbg(
    captions: Sequence[str], *, image_size: int = 64, width: int = 32, seed: int = 0, **overrides: Any
) -> tuple[SbgModel, SbgText]:
    """A random tiny SBG; tokenizers and keyword vocabulary (every content word) from ``captions``."""
    text = SbgText(Gpt2Text(build_small_gpt2_tokenizer(captions)), build_small_clip_tokenizer(captions))
    keywords = overrides.pop("keywords", None) or build_keywords(captions, min_count=1)
    values: dict[str, Any] = dict(keywords=keywords, keyword_bias_init=keyword_bias(captions, keywords), max_caption_tokens=48) | overrides
    config = SbgConfig(
        clip_vision=tiny_clip_vision_config(image_size, width),
        clip_text=tiny_clip_text_config(text.clip, width),
        gpt2=tiny_gpt2_config(len(text.gpt2), text.gpt2.eos_id, width),
        **values,
    )
    torch.manual_seed(seed)
    return SbgModel(config), text


def compose_sbg(
    out: Path,
    *,
    clip: str,
    gpt2: str,
    captions: Sequence[str],
    max_keywords: int = 300,
    min_count: int = 2,
    top_k: int = 10,
    candidates: int = 5,
    train_clip: bool = True,
    name: str = "",
    log: Callable[[str], None] = print,
) -> Path:
    """An SBG checkpoint: CLIP (both towers, its tokenizer and logit scale) and GPT-2 from pretrained
    sources, the keyword vocabulary from the training ``captions``."""
    from transformers import AutoTokenizer

    from models.checkpoint import Provenance, save
    from models.clip_parts import load_clip, tower_from
    from models.sources import ComposeError, resolve, source_sha

    keywords = build_keywords(captions, max_keywords=max_keywords, min_count=min_count)
    if not keywords:
        raise ComposeError(f"--captions: no word occurs in {min_count} or more of the {len(captions)} captions: no keyword vocabulary")
    log(f"loading CLIP from {clip}")
    clip_model = load_clip(clip, "--clip")
    vision, vision_weights = tower_from(clip_model, "vision")
    text_tower, text_weights = tower_from(clip_model, "text")
    try:
        clip_tokenizer = AutoTokenizer.from_pretrained(resolve(clip, "--clip"))
    except (OSError, ValueError) as exc:
        raise ComposeError(f"--clip {clip}: no CLIP tokenizer beside the weights ({exc})") from None
    try:
        check_clip_eos(text_tower, clip_tokenizer)
    except ConfigError as exc:
        raise ComposeError(f"--clip {clip}: {exc}") from None
    log(f"loading GPT-2 from {gpt2}")
    lm, gpt2_text = load_gpt2(gpt2)
    config = SbgConfig(
        clip_vision=vision,
        clip_text=text_tower,
        gpt2=config_kwargs(lm.config),
        keywords=keywords,
        top_k=top_k,
        candidates=candidates,
        train_clip=train_clip,
        logit_scale_init=float(clip_model.logit_scale.detach()),
        keyword_bias_init=keyword_bias(captions, keywords),
        name=name,
    )
    log(f"building {config.display_name} with {len(keywords)} keywords")
    model = SbgModel(config)
    model.clip.model.load_state_dict(vision_weights, strict=True)
    model.clip_text.model.load_state_dict(text_weights, strict=True)
    model.lm.load_state_dict(lm.state_dict(), strict=True)
    vocabulary_sha = hashlib.sha256("\n".join(keywords).encode()).hexdigest()
    clip_part = "CLIP (vision and text towers, projections, logit scale) and its tokenizer"
    provenance = Provenance(
        sources=[
            {"part": clip_part, "source": clip, "sha256": source_sha(resolve(clip, "--clip"))},
            {"part": "GPT-2 and its tokenizer", "source": gpt2, "sha256": source_sha(resolve(gpt2, "--gpt2"))},
            {"part": f"keyword vocabulary ({len(keywords)} words)", "source": f"{len(captions)} captions", "sha256": vocabulary_sha},
        ],
        initialised=[
            "image adapter (identity: CLIP's own embedding until trained)",
            "keyword score scale and bias",
            "GPT-2 has not learned to write from keyword prompts (train it: medcap train caption)",
        ],
    )
    sha = save(model, SbgText(gpt2_text, clip_tokenizer), out, provenance)
    log(f"wrote {out} (weights sha256 {sha})")
    return out


def _compose(request: ComposeRequest) -> Path:
    o = request.options
    return compose_sbg(request.out, clip=o["clip"], gpt2=o["gpt2"], captions=request.captions, name=request.name, log=request.log)


FAMILY = Family(
    config=SbgConfig,
    model=SbgModel,
    text=SbgText,
    description="SBG: CLIP scores keywords, GPT-2 writes from the keywords alone, CLIP reranks the candidates (Huynh et al.)",
    # As ClipCap in the same paper (AdamW 2e-5, warm-up, batch 40, 10 epochs, gradient clipping):
    # both fine-tune GPT-2 on the same captions.
    fit_defaults={
        "epochs": 10,
        "batch_size": 40,
        "lr": 2e-5,
        "optimizer": "adamw",
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "warmup_steps": 5000,
        "patience": None,
    },
    compose=_compose,
)
