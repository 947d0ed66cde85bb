"""The image inputs a captioner reads, declared by its family and produced here by name.

A view is a name (the key under which the model finds it), a square size and a normalisation;
every view is computed from the same raw [0, 1] image, never from another view (see
``dicom_io/transforms.py`` for why). A family lists its views in its config (``views``), and the
pipeline computes exactly those, so a new family with a new view needs no change here unless it
needs a normalisation this module does not know.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from dicom_io.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, sam_input, square_input

#: ``clip``: bicubic square resize, CLIP statistics. ``sam``: SAM's longest-side bilinear resize,
#: SAM statistics, zero padding (the content size matters). ``imagenet``: as ``clip`` with ImageNet
#: statistics. ``unit``: as ``clip``, left in [0, 1]. ``mean_std``: as ``clip`` with the view's own
#: ``mean`` / ``std`` (an encoder whose preprocessor has other statistics, e.g. MobileNetV2's 0.5).
NORMALISATIONS = ("clip", "sam", "imagenet", "unit", "mean_std")

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_SQUARE_STATISTICS = {
    "clip": (CLIP_MEAN, CLIP_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class ImageView:
    """One image input of a captioner: ``name`` (its key in the model's pixels), ``size`` (the side of
    the square array) and ``normalisation`` (one of :data:`NORMALISATIONS`; ``mean``/``std`` with ``mean_std`` only)."""

    name: str
    size: int
    normalisation: str
    mean: Triple | None = None
    std: Triple | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(f"ImageView.name must be a lower-case identifier such as 'clip', got {self.name!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"ImageView.size must be a positive integer, got {self.size!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"ImageView.normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")
        if self.normalisation == "mean_std":
            mean, std = _triple(self.mean, "mean"), _triple(self.std, "std")
            if min(std) <= 0:
                raise ValueError(f"ImageView.std must be positive, got {std}")
            object.__setattr__(self, "mean", mean)  # lists from a JSON config become tuples of floats
            object.__setattr__(self, "std", std)
        elif self.mean is not None or self.std is not None:
            raise ValueError(f"ImageView.mean, ImageView.std: only for normalisation 'mean_std', not {self.normalisation!r}")

    @property
    def padded(self) -> bool:
        """Whether the image keeps its aspect inside the square (the rest is zero padding)."""
        return self.normalisation == "sam"


def view_array(view: ImageView, image01: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """The (3, size, size) float32 array of ``view`` from a [0, 1] image, and the (height, width) of
    the image inside it (the whole square unless the view is padded)."""
    if view.normalisation == "sam":
        return sam_input(image01, view.size)
    if view.normalisation == "mean_std":
        assert view.mean is not None and view.std is not None  # checked by ImageView
        mean, std = view.mean, view.std
    else:
        mean, std = _SQUARE_STATISTICS[view.normalisation]
    return square_input(image01, view.size, mean, std, caller=f"view {view.name!r}"), (view.size, view.size)


def check_views(views: Iterable[ImageView], what: str = "views") -> tuple[ImageView, ...]:
    """``views`` as a tuple: at least one, each an :class:`ImageView`, names distinct."""
    chosen = tuple(views)
    if not chosen:
        raise ValueError(f"{what}: at least one view is needed")
    for view in chosen:
        if not isinstance(view, ImageView):
            raise ValueError(f"{what}: expected ImageView values, got {view!r}")
    names = [v.name for v in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: view names must be distinct, got {names}")
    return chosen


def _triple(value: Sequence[float] | None, field: str) -> Triple:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 3
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"ImageView.{field} must be three numbers with normalisation 'mean_std', got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))
