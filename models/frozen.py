"""Frozen parts: pretrained encoders and language models that no optimiser touches."""

from __future__ import annotations

from torch import nn


def freeze(module: nn.Module) -> nn.Module:
    """Frozen encoders stay in eval mode (no dropout) and out of every optimiser."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    module.train = lambda mode=True: module  # type: ignore[method-assign]
    return module
