"""Which slices of a series the captioner sees, and the SOP instances the SR will cite for them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from dicom_io.intensity import Percentiles
from dicom_io.series import Series

Strategy = Literal["central", "uniform", "content"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)

#: CT foreground: above this HU is body (fat is about -100), below is air, padding or outside the FOV.
CT_BODY_HU = -500.0
#: Other modalities: foreground is above this fraction of the series' 1st–99th percentile range.
FOREGROUND_FRACTION = 0.1


@dataclass(frozen=True)
class KeySliceSpec:
    """How to choose key slices.

    - ``central``: the ``n`` neighbouring slices in the middle of the stack;
    - ``uniform``: ``n`` slices evenly spaced in mm along the normal, leaving out ``margin`` of the
      extent at each end (n=1: the middle);
    - ``content``: among slices whose foreground area is at least ``content_fraction`` of the
      largest, ``n`` slices spread evenly along the normal.

    A series with fewer than ``n`` slices yields all of them.
    """

    strategy: Strategy = "uniform"
    n: int = 3
    margin: float = 0.1
    content_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"KeySliceSpec.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"KeySliceSpec.n must be an integer >= 1, got {self.n!r}")
        if not 0 <= self.margin < 0.5:
            raise ValueError(f"KeySliceSpec.margin must be in [0, 0.5), got {self.margin}")
        if not 0 < self.content_fraction <= 1:
            raise ValueError(f"KeySliceSpec.content_fraction must be in (0, 1], got {self.content_fraction}")


DEFAULT_KEY_SLICES = KeySliceSpec()


@dataclass(frozen=True)
class KeySlices:
    """Chosen slices in series order: indices into ``Series.slices`` and what an SR needs to reference them."""

    indices: tuple[int, ...]
    sop_instance_uids: tuple[str, ...]
    frames: tuple[int | None, ...]  # 1-based frame numbers for multi-frame instances
    positions: tuple[float, ...]  # mm along the normal

    def __post_init__(self) -> None:
        if not self.indices:
            raise ValueError("KeySlices.indices is empty")
        if list(self.indices) != sorted(set(self.indices)):
            raise ValueError(f"KeySlices.indices must be increasing and unique, got {self.indices}")
        if not len(self.indices) == len(self.sop_instance_uids) == len(self.frames) == len(self.positions):
            raise ValueError("KeySlices.indices, sop_instance_uids, frames and positions differ in length")

    def __len__(self) -> int:
        return len(self.indices)


def select_key_slices(series: Series, spec: KeySliceSpec | Strategy = DEFAULT_KEY_SLICES) -> KeySlices:
    """Choose key slices of ``series`` by ``spec`` (a :class:`KeySliceSpec` or a strategy name)."""
    if isinstance(spec, str):
        spec = KeySliceSpec(strategy=spec)
    count = len(series)
    n = min(spec.n, count)
    positions = np.asarray(series.positions)
    if spec.strategy == "central":
        start = (count - n + 1) // 2  # n=1 on an even count: the upper middle, as Series.window
        chosen = list(range(start, start + n))
    elif spec.strategy == "uniform":
        low, high = positions[0], positions[-1]
        inset = spec.margin * (high - low)
        chosen = _nearest(list(range(count)), positions, _targets(low + inset, high - inset, n, ends=True))
    else:
        areas = foreground_areas(series)
        if areas.max() <= 0:  # nothing but background: fall back to the middle of the stack
            return select_key_slices(series, KeySliceSpec("central", spec.n))
        candidates = [i for i in range(count) if areas[i] >= spec.content_fraction * areas.max()]
        if len(candidates) < n:
            candidates = sorted(np.argsort(-areas, kind="stable")[:n].tolist())
        chosen = _nearest(candidates, positions, _targets(positions[candidates[0]], positions[candidates[-1]], n, ends=False))
    chosen.sort()
    slices = [series.slices[i] for i in chosen]
    return KeySlices(
        indices=tuple(chosen),
        sop_instance_uids=tuple(s.sop_instance_uid for s in slices),
        frames=tuple(s.frame for s in slices),
        positions=tuple(s.position for s in slices),
    )


def foreground_areas(series: Series) -> np.ndarray:
    """Fraction of each slice's pixels that are body rather than air or background, in series order."""
    if series.modality == "CT":
        threshold = CT_BODY_HU
    else:
        low, high = Percentiles().limits(series)
        threshold = low + FOREGROUND_FRACTION * (high - low)
    return np.array([float(np.mean(s.pixels > threshold)) for s in series.slices])


def _targets(low: float, high: float, n: int, *, ends: bool) -> list[float]:
    """n positions spread over [low, high]: including both ends, or at the centres of n equal bins."""
    if n == 1:
        return [(low + high) / 2]
    if ends:
        return [float(x) for x in np.linspace(low, high, n)]
    return [low + (high - low) * (k + 0.5) / n for k in range(n)]


def _nearest(candidates: Sequence[int], positions: np.ndarray, targets: Sequence[float]) -> list[int]:
    """For each target, the closest candidate not yet taken (ties to the lower index)."""
    free = list(candidates)
    chosen = []
    for target in targets:
        best = min(free, key=lambda i: (abs(positions[i] - target), i))
        free.remove(best)
        chosen.append(best)
    return chosen
