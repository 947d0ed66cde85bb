"""CNN-LSTM (Zain et al.): a frozen MobileNetV2, a Linear + BatchNorm image embedding, an LSTM over words.

The pooled MobileNetV2 feature (1280-d at width 1.0) becomes a 256-d embedding that is the LSTM's
first input ("Show and Tell": the image primes the state), then ``<SOS>`` and the caption's words;
the outputs after ``<SOS>`` ... the last word predict the words and ``<EOS>``. Training runs on
packed sequences with cross-entropy over real tokens only. Captions are generated greedily or
with a beam search (models/beam.py) over a word vocabulary (models/word_vocab.py).

The encoder reads its own view, ``mobilenet``: a bicubic square at ``image_size`` in the source
checkpoint's normalisation (``pixel_mean`` / ``pixel_std``; ``google/mobilenet_v2_1.0_224``: 0.5 and 0.5),
computed by the pipeline from the unit image (``dicom_io/image_views.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from transformers import MobileNetV2Config, MobileNetV2Model

from dicom_io.image_views import ImageView
from models.beam import evaluating, search
from models.config import ConfigError, JsonConfig
from models.families import ComposeRequest, Family
from models.frozen import freeze
from models.generation import GenerationPreset
from models.word_vocab import EOS, PAD, SOS, WordVocab, check_vocabulary_fields, vocabulary_source

FORMAT_VERSION = 1
VIEW = "mobilenet"  # the image view the encoder reads


@dataclass
class CnnLstmConfig(JsonConfig):
    #: Words in the vocabulary, the four specials included (``len(WordVocab)``).
    vocab_size: int
    #: ``transformers.MobileNetV2Config`` arguments.
    mobilenet: dict[str, Any]
    #: Side of the square view the encoder reads (224 for ``google/mobilenet_v2_1.0_224``).
    image_size: int = 224
    #: The encoder's input normalisation on the [0, 1] scale (its preprocessor's image_mean / image_std).
    pixel_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    pixel_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    embed_dim: int = 256
    hidden_dim: int = 512
    num_layers: int = 1
    #: Longest training target, ``<SOS>`` and ``<EOS>`` included (longer captions lose their last words).
    max_caption_tokens: int = 52
    #: How often a word had to occur in the training captions to enter the vocabulary.
    min_word_count: int = 5
    model_type: str = "cnn_lstm"
    version: str = "0.1.0"
    name: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.require_model_type("cnn_lstm")
        self.require_positive("vocab_size", "image_size", "embed_dim", "hidden_dim", "num_layers", "max_caption_tokens", "min_word_count")
        check_vocabulary_fields(self.vocab_size, self.max_caption_tokens)
        self.require_arguments("mobilenet", MobileNetV2Config)
        for name in ("pixel_mean", "pixel_std"):
            value = getattr(self, name)
            if (
                not isinstance(value, list | tuple)
                or len(value) != 3
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            ):
                raise ConfigError(f"{name}: must be three numbers, got {value!r}")
            setattr(self, name, [float(v) for v in value])
        if min(self.pixel_std) <= 0:
            raise ConfigError(f"pixel_std: must be positive, got {self.pixel_std}")
        self.require_format(FORMAT_VERSION)

    @property
    def display_name(self) -> str:
        return self.name or "CNN-LSTM"

    @property
    def views(self) -> tuple[ImageView, ...]:
        mean, std = self.pixel_mean, self.pixel_std
        return (ImageView(VIEW, self.image_size, "mean_std", mean=(mean[0], mean[1], mean[2]), std=(std[0], std[1], std[2])),)

    def summary(self) -> list[str]:
        width = self.mobilenet.get("depth_multiplier", 1.0)
        return [
            f"- model type: `cnn_lstm` ({self.display_name}), version {self.version}",
            f"- encoder: MobileNetV2 (width {width}), frozen, pooled features at {self.image_size} px; "
            f"input mean {self.pixel_mean}, std {self.pixel_std}",
            f"- decoder: Linear + BatchNorm1d image embedding ({self.embed_dim}), LSTM ({self.num_layers} layer(s), hidden "
            f"{self.hidden_dim}), the image as its first input",
            f"- vocabulary: {self.vocab_size} words incl. 4 specials (words seen at least {self.min_word_count} times)",
        ]


class FeatureNorm(nn.BatchNorm1d):
    """BatchNorm1d that also takes a training batch of one, on its running statistics (left untouched):
    a lone sample has no batch statistics, and plain BatchNorm1d refuses it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class CnnLstmModel(nn.Module):
    def __init__(self, config: CnnLstmConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = freeze(MobileNetV2Model(MobileNetV2Config(**config.mobilenet)))
        last: Any = self.encoder.conv_1x1  # MobileNetV2's last 1x1 convolution block
        features = int(last.convolution.out_channels)
        self.image_embedding = nn.Sequential(nn.Linear(features, config.embed_dim), FeatureNorm(config.embed_dim))
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=PAD)
        self.lstm = nn.LSTM(config.embed_dim, config.hidden_dim, config.num_layers, batch_first=True)
        self.head = nn.Linear(config.hidden_dim, config.vocab_size)

    @property
    def feature_dim(self) -> int:
        first: Any = self.image_embedding[0]
        return int(first.in_features)

    # -- images ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, pixels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"pooled": (B, feature_dim)} from the ``mobilenet`` view (already in MobileNet's normalisation), in the encoder's dtype."""
        if VIEW not in pixels:
            raise ValueError(f"pixels: {self.config.display_name} reads the {VIEW!r} view, got {sorted(pixels)}")
        param = next(self.encoder.parameters())
        return {"pooled": self.encoder(pixel_values=pixels[VIEW].to(device=param.device, dtype=param.dtype)).pooler_output}

    def _image_inputs(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, embed_dim) fp32: the trainable part starts here, whatever dtype the encoder ran in."""
        return self.image_embedding(features["pooled"].to(device=self.head.weight.device, dtype=self.head.weight.dtype))

    def _check(self, text: WordVocab) -> None:
        if len(text) != self.config.vocab_size:
            raise ValueError(f"vocabulary: {len(text)} words, but {self.config.display_name} was built for {self.config.vocab_size}")

    # -- training --------------------------------------------------------------------------------

    def caption_loss(self, features: dict[str, torch.Tensor], captions: Sequence[str], text: WordVocab) -> torch.Tensor:
        """Mean cross-entropy per target token (words and ``<EOS>``) over the batch."""
        self._check(text)
        if features["pooled"].shape[0] != len(captions):
            raise ValueError(f"captions: {len(captions)} for {features['pooled'].shape[0]} images")
        ids, lengths = text.encode_batch(captions, self.config.max_caption_tokens)
        ids = ids.to(self.head.weight.device)
        # Position 0 is the image, then <SOS> w1 .. wn: as many inputs as encoded tokens.
        inputs = torch.cat([self._image_inputs(features)[:, None], self.embed(ids[:, :-1])], dim=1)
        # Each input predicts the token after it; the image predicts nothing (PAD is ignored).
        targets = torch.cat([torch.full_like(ids[:, :1], PAD), ids[:, 1:]], dim=1)
        packed = pack_padded_sequence(inputs, lengths, batch_first=True, enforce_sorted=False)
        packed_targets = pack_padded_sequence(targets, lengths, batch_first=True, enforce_sorted=False)
        hidden, _ = self.lstm(packed)
        return F.cross_entropy(self.head(hidden.data), packed_targets.data, ignore_index=PAD)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("encoder.")]

    # -- inference -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_captions(self, features: dict[str, torch.Tensor], text: WordVocab, preset: GenerationPreset) -> list[str]:
        self._check(text)
        with evaluating(self):
            _, (h, c) = self.lstm(self._image_inputs(features)[:, None])

            # The search keeps rows first; the LSTM wants (layers, rows, hidden).
            def step(tokens: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
                h, c = (s.transpose(0, 1).contiguous() for s in state)
                out, (h, c) = self.lstm(self.embed(tokens[:, -1:]), (h, c))
                return F.log_softmax(self.head(out[:, -1]).float(), dim=-1), (h.transpose(0, 1), c.transpose(0, 1))

            ids = search(step, (h.transpose(0, 1), c.transpose(0, 1)), h.shape[1], preset, sos=SOS, eos=EOS, banned=(PAD, SOS))
        return [text.decode(row) for row in ids]

    def place(self, device: torch.device, dtype: torch.dtype | None) -> None:
        """Move to ``device``; MobileNet in ``dtype``, the trainable embedding and LSTM stay fp32."""
        self.to(device)
        if dtype is not None and dtype != torch.float32:
            self.encoder.to(dtype)


# -- construction ------------------------------------------------------------------------------


def calibrate_batchnorm(encoder: nn.Module, pixels: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of ``pixels`` (a random encoder's
    activations otherwise shrink to nothing through MobileNet's ~50 layers)."""
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one pass gives the batch's statistics
        norm.train()
    with torch.no_grad():
        encoder(pixel_values=pixels)
    for norm in norms:
        norm.momentum = 0.1
        norm.eval()


def tiny_mobilenet_config(image_size: int = 64) -> dict[str, Any]:
    """A quarter-width MobileNetV2 with a 320-d pooled feature; seconds on CPU."""
    return dict(depth_multiplier=0.25, min_depth=4, finegrained_output=False, image_size=image_size)


def tiny_cnn_lstm(
    captions: Sequence[str], *, image_size: int = 64, width: int = 32, seed: int = 0, **overrides: Any
) -> tuple[CnnLstmModel, WordVocab]:
    """A random tiny CNN-LSTM and a vocabulary of every word in ``captions``; CPU-fast (tests, synthetic benchmark).

    The random MobileNet's BatchNorm statistics are calibrated on noise, so its features vary with the image.
    """
    min_count = int(overrides.pop("min_word_count", 1))
    vocab = WordVocab.build(captions, min_count)
    values: dict[str, Any] = dict(embed_dim=width, hidden_dim=2 * width, max_caption_tokens=48) | overrides
    config = CnnLstmConfig(
        vocab_size=len(vocab), mobilenet=tiny_mobilenet_config(image_size), image_size=image_size, min_word_count=min_count, **values
    )
    torch.manual_seed(seed)
    model = CnnLstmModel(config)
    noise = torch.randn(8, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    calibrate_batchnorm(model.encoder, noise)
    return model, vocab


def _mobilenet_kwargs(hf_config: Any) -> dict[str, Any]:
    from transformers import PretrainedConfig

    generic = set(PretrainedConfig().to_dict())
    return {k: v for k, v in hf_config.to_dict().items() if k in set(MobileNetV2Config().to_dict()) - generic}


def _preprocessor(source: Path | str) -> dict[str, Any] | None:
    """The source's ``preprocessor_config.json`` (local directory or hub cache), if it has one."""
    from transformers.utils.hub import cached_file

    try:
        path = cached_file(
            str(source),
            "preprocessor_config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        return json.loads(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None


def compose_cnn_lstm(
    out: Path,
    *,
    mobilenet: str,
    captions: Sequence[str],
    min_word_count: int = 5,
    name: str = "",
    log: Callable[[str], None] = print,
    **overrides: Any,
) -> Path:
    """A CNN-LSTM checkpoint from a pretrained MobileNetV2 (``google/mobilenet_v2_1.0_224`` or a local copy,
    classifier checkpoints included) and a vocabulary of ``captions``; everything after the encoder starts untrained."""
    from models.checkpoint import Provenance, save
    from models.sources import from_pretrained_strict, resolve, source_sha

    resolved = resolve(mobilenet, "--mobilenet")
    log(f"loading MobileNetV2 from {mobilenet}")
    source = from_pretrained_strict(MobileNetV2Model, resolved, "--mobilenet", "MobileNetV2")
    values: dict[str, Any] = {"image_size": int(source.config.image_size)}
    processor = _preprocessor(resolved)
    if processor is None:
        log("no preprocessor_config.json: MobileNet input normalised with mean and std 0.5 (google/mobilenet_v2_1.0_224)")
    else:
        if processor.get("do_normalize", True):
            values |= {"pixel_mean": processor.get("image_mean", [0.5] * 3), "pixel_std": processor.get("image_std", [0.5] * 3)}
        else:
            values |= {"pixel_mean": [0.0] * 3, "pixel_std": [1.0] * 3}
        crop = processor.get("crop_size")
        if processor.get("do_center_crop", True) and crop:
            values["image_size"] = int(crop["height"] if isinstance(crop, dict) else crop)
    vocab = WordVocab.build(captions, min_word_count)
    log(f"vocabulary: {len(vocab.words)} words seen at least {min_word_count} times in {len(captions)} captions")
    config = CnnLstmConfig(
        vocab_size=len(vocab), mobilenet=_mobilenet_kwargs(source.config), min_word_count=min_word_count, name=name, **(values | overrides)
    )
    log(f"building {config.display_name}")
    model = CnnLstmModel(config)
    model.encoder.load_state_dict(source.state_dict(), strict=True)  # BatchNorm running statistics included
    provenance = Provenance(
        sources=[
            {"part": "MobileNetV2 image encoder", "source": mobilenet, "sha256": source_sha(resolved)},
            vocabulary_source(captions, min_word_count),
        ],
        initialised=["image embedding (Linear + BatchNorm1d), word embeddings, LSTM and output layer (train them: medcap train caption)"],
    )
    sha = save(model, vocab, out, provenance)
    log(f"wrote {out} (weights sha256 {sha})")
    return out


def _compose(request: ComposeRequest) -> Path:
    o = request.options
    return compose_cnn_lstm(
        request.out,
        mobilenet=o["mobilenet"],
        captions=request.captions,
        min_word_count=o["min_word_count"],
        name=request.name,
        log=request.log,
    )


FAMILY = Family(
    config=CnnLstmConfig,
    model=CnnLstmModel,
    text=WordVocab,
    description="CNN-LSTM: frozen MobileNetV2 pooled features -> Linear + BatchNorm -> LSTM over words (Zain et al.)",
    # Zain et al. / the "Show and Tell" recipe their code follows: Adam at 1e-3, batch 64, no
    # clipping, early stopping on validation loss (patience 2, best weights kept).
    fit_defaults={
        "epochs": 20,
        "batch_size": 64,
        "lr": 1e-3,
        "optimizer": "adam",
        "weight_decay": 0.0,
        "grad_clip": None,
        "patience": 2,
        "warmup_steps": 0,
    },
    compose=_compose,
)
