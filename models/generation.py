"""Generation presets and device/precision placement.

transformers 5.x counts ``max_length`` over the input embeddings too, so presets are in new
tokens (``max_new_tokens``/``min_new_tokens``) — MSMedCap's 10–50 are new-token counts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class GenerationPreset:
    name: str
    num_beams: int
    max_new_tokens: int
    min_new_tokens: int
    repetition_penalty: float
    length_penalty: float
    #: Captioners that rerank (SBG): how many candidate captions the image embedding chooses from;
    #: None keeps the model's own default. Others ignore it.
    candidates: int | None = None

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError("num_beams: must be at least 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError("min_new_tokens: must be between 0 and max_new_tokens")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty: must be positive")
        if self.candidates is not None and self.candidates < 1:
            raise ValueError("candidates: must be at least 1")

    def with_beams(self, num_beams: int) -> GenerationPreset:
        return replace(self, num_beams=num_beams)

    def with_candidates(self, candidates: int | None) -> GenerationPreset:
        return replace(self, candidates=candidates)


PRESETS = {
    # MSMedCap's evaluation settings (blip2_opt.generate), in transformers 5.x terms.
    "paper": GenerationPreset("paper", num_beams=15, max_new_tokens=50, min_new_tokens=10, repetition_penalty=9.0, length_penalty=1.2),
    # Production drafts: greedy; ``--beams 3`` for a little more quality.
    "fast": GenerationPreset("fast", num_beams=1, max_new_tokens=40, min_new_tokens=1, repetition_penalty=1.0, length_penalty=1.0),
}


def preset(name: str) -> GenerationPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"generation preset {name!r} is not one of {sorted(PRESETS)}") from None


def select_device(spec: str = "auto") -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked."""
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"device {spec!r} is not cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise ValueError(f"device {spec!r} is not cpu, cuda or cuda:N")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """The frozen parts' dtype on ``device`` (Q-Formers stay fp32): bf16 on GPUs that compute in it
    (compute capability 8.0 and newer: A100, L4, H100, H200), fp16 on older ones (T4, V100: bf16
    there is emulated or missing), fp32 on CPU."""
    if device.type != "cuda":
        return torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16
