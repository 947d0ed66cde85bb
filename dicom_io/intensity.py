"""Modality units to unit-range float32 images: CT windows on HU, robust percentile scaling for MR.

One mapping per series (never per slice), so that the same tissue has the same brightness on every
slice the captioner sees.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from dicom_io.series import Series


@dataclass(frozen=True)
class Window:
    """A linear CT window in HU: ``center - width/2`` maps to 0 and ``center + width/2`` to 1."""

    center: float
    width: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.center):
            raise ValueError(f"Window.center must be finite, got {self.center}")
        if not math.isfinite(self.width) or self.width <= 0:
            raise ValueError(f"Window.width must be finite and > 0, got {self.width}")

    def apply(self, values: np.ndarray) -> np.ndarray:
        low = self.center - self.width / 2
        out = (np.asarray(values, dtype=np.float32) - np.float32(low)) / np.float32(self.width)
        return np.clip(out, 0.0, 1.0, out=out)


#: Window presets (center/width, HU) after Radiopaedia, "Windowing (CT)"; subdural and stroke use
#: values inside its published ranges (subdural L 50–100 / W 130–300; stroke L 32–40 / W 8–40).
CT_WINDOWS: Mapping[str, Window] = MappingProxyType(
    {
        "brain": Window(40, 80),
        "subdural": Window(75, 215),
        "stroke": Window(40, 40),
        "bone": Window(400, 1800),
        "temporal_bone": Window(600, 2800),
        "soft_tissue": Window(50, 350),
        "lung": Window(-600, 1500),
    }
)
AUTO = "auto"  # the series' own WindowCenter/WindowWidth
PERCENTILES = "percentiles"  # Percentiles() with its defaults
_MIN_WIDTH = 1e-6

#: BodyPartExamined values that get the head window by default (Philips writes BRAIN for a head CT).
HEAD_BODY_PARTS: frozenset[str] = frozenset({"HEAD", "BRAIN", "SKULL"})


@dataclass(frozen=True)
class Percentiles:
    """Robust scaling: the ``low``-th percentile of the whole series maps to 0, the ``high``-th to 1.

    For series of more than ``max_samples`` pixels, a regular subsample of every slice is used, so
    memory stays bounded while every slice still contributes.
    """

    low: float = 1.0
    high: float = 99.0
    max_samples: int = 4_000_000

    def __post_init__(self) -> None:
        if not (0 <= self.low < self.high <= 100):
            raise ValueError(f"Percentiles.low/high must satisfy 0 <= low < high <= 100, got {self.low}/{self.high}")
        if self.max_samples < 1:
            raise ValueError(f"Percentiles.max_samples must be >= 1, got {self.max_samples}")

    def limits(self, series: Series) -> tuple[float, float]:
        """The (low, high) percentile values over all slices of ``series``."""
        first = series.slices[0]
        step = max(1, math.ceil(len(series) * first.rows * first.columns / self.max_samples))
        samples = np.concatenate([s.pixels.ravel()[::step] for s in series.slices])
        low, high = np.percentile(samples, [self.low, self.high])
        return float(low), float(high)

    def window(self, series: Series) -> Window:
        """The linear window that maps this series' low/high percentiles to 0/1."""
        low, high = self.limits(series)
        width = max(high - low, _MIN_WIDTH)  # a constant series: any positive width gives a constant image
        return Window((low + high) / 2, width)


Intensity = Window | Percentiles


def resolve_intensity(
    series: Series, intensity: str | Intensity | None = None, *, head_window: str = "brain", body_window: str = "soft_tissue"
) -> Intensity:
    """The mapping to use for ``series``.

    ``None`` picks by modality: CT gets ``head_window`` when BodyPartExamined is a head (see
    :data:`HEAD_BODY_PARTS`) and ``body_window`` otherwise; anything else gets :class:`Percentiles`.
    ``"auto"`` is the series' own header window (the central slice's), falling back to that default.
    A preset name from :data:`CT_WINDOWS` is only accepted for CT, whose values are HU.
    """
    for name, value in (("head_window", head_window), ("body_window", body_window)):
        if value not in CT_WINDOWS:
            raise ValueError(f"{name} {value!r} is not a CT window preset; choose from {sorted(CT_WINDOWS)}")
    if isinstance(intensity, Window | Percentiles):
        return intensity
    if intensity is None:
        if series.modality != "CT":
            return Percentiles()
        head = (series.body_part or "").upper() in HEAD_BODY_PARTS
        return CT_WINDOWS[head_window if head else body_window]
    if intensity == AUTO:
        window = series.window
        if window is not None:
            return Window(*window)
        return resolve_intensity(series, None, head_window=head_window, body_window=body_window)
    if intensity == PERCENTILES:
        return Percentiles()
    if intensity in CT_WINDOWS:
        if series.modality != "CT":
            raise ValueError(f"window {intensity!r} is a CT preset in HU; series {series.series_uid} is {series.modality}")
        return CT_WINDOWS[intensity]
    raise ValueError(f"window {intensity!r} is unknown; choose from {sorted(CT_WINDOWS)}, {AUTO!r}, {PERCENTILES!r}")


def unit_images(
    series: Series,
    indices: Sequence[int] | None = None,
    intensity: str | Intensity | None = None,
    *,
    head_window: str = "brain",
    body_window: str = "soft_tissue",
) -> np.ndarray:
    """The slices at ``indices`` (all by default) as an (N, rows, columns) float32 array in [0, 1].

    ``intensity`` is as for :func:`resolve_intensity`. Percentile limits always come from the whole
    series, whichever slices are returned.
    """
    chosen = range(len(series)) if indices is None else list(indices)
    for i in chosen:
        if not 0 <= i < len(series):
            raise IndexError(f"slice index {i} is out of range for a series of {len(series)} slices")
    window = series_window(series, intensity, head_window=head_window, body_window=body_window)
    first = series.slices[0]
    out = np.empty((len(chosen), first.rows, first.columns), dtype=np.float32)
    for k, i in enumerate(chosen):
        out[k] = window.apply(series.slices[i].pixels)
    return out


def series_window(
    series: Series, intensity: str | Intensity | None = None, *, head_window: str = "brain", body_window: str = "soft_tissue"
) -> Window:
    """The one window used for every slice of ``series``; percentiles are evaluated over the whole series."""
    mapping = resolve_intensity(series, intensity, head_window=head_window, body_window=body_window)
    return mapping.window(series) if isinstance(mapping, Percentiles) else mapping
