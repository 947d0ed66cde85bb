"""Overall progress of a training run made of several stages, each with its own step bar.

Each stage's own tqdm bar shows that stage only; someone waiting for ``scripts/run`` wants the whole
run: which stage of how many, and roughly how long is left. The estimate is the seconds per step
measured on the stages finished so far, applied to the steps still to come (each stage's
steps weighted by their relative cost), so it is honest about
what it knows: before any training stage has finished it says it is still estimating.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True)
class Stage:
    """One stage of a run: its name, how many training steps it takes (0: no training steps) and
    ``weight``, the relative cost of one of its steps (steps of different stages cost different time)."""

    name: str
    steps: int
    weight: float = 1.0

    @property
    def work(self) -> float:
        return self.steps * self.weight

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Stage.name: must not be empty")
        if self.steps < 0:
            raise ValueError(f"Stage.steps: must be 0 or more, got {self.steps}")
        if not self.weight > 0:
            raise ValueError(f"Stage.weight: must be above 0, got {self.weight}")


def clock_text(seconds: float) -> str:
    """``mm:ss`` (``h:mm:ss`` from an hour on)."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class StageProgress:
    """Prints one line as each stage starts, ``stage 3/5 stage 1, CLIP Q-Former (300 steps), elapsed 01:12, ETA 04:30``,
    and one when the run is done. Stages must be started in the order given."""

    def __init__(
        self,
        stages: Sequence[Stage],
        *,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        enabled: bool = True,
    ) -> None:
        if not stages:
            raise ValueError("StageProgress.stages: give at least one stage")
        self.stages = tuple(stages)
        self._out = out
        self._clock = clock
        self._enabled = enabled
        self._began = clock()
        self._next = 0  # index of the stage to start next
        self._stage_began = self._began
        self._work_done = 0.0
        self._training_seconds = 0.0

    def _finish_current(self, now: float) -> None:
        if self._next:
            finished = self.stages[self._next - 1]
            if finished.steps:
                self._work_done += finished.work
                self._training_seconds += now - self._stage_began

    def eta_seconds(self) -> float | None:
        """Seconds left for the stages not yet finished (the one running included), or None before any rate is known."""
        remaining = sum(s.work for s in self.stages[max(0, self._next - 1) :])
        if not remaining:
            return 0.0
        if not self._work_done:
            return None
        return remaining * self._training_seconds / self._work_done

    def start(self, name: str) -> None:
        """Stage ``name`` begins: it must be the next one in the list."""
        if self._next >= len(self.stages) or self.stages[self._next].name != name:
            expected = self.stages[self._next].name if self._next < len(self.stages) else "none (all started)"
            raise ValueError(f"StageProgress.start: stage {name!r} out of order; expected {expected!r}")
        now = self._clock()
        self._finish_current(now)
        self._next += 1
        self._stage_began = now
        stage = self.stages[self._next - 1]
        eta = self.eta_seconds()
        steps = f" ({stage.steps} steps)" if stage.steps else ""
        left = "ETA estimating (after the first training stage)" if eta is None else f"ETA {clock_text(eta)}"
        self._print(f"stage {self._next}/{len(self.stages)} {stage.name}{steps}, elapsed {clock_text(now - self._began)}, {left}")

    def done(self) -> None:
        now = self._clock()
        self._finish_current(now)
        self._next = len(self.stages) + 1
        self._print(f"all {len(self.stages)} stages done in {clock_text(now - self._began)}")

    def _print(self, line: str) -> None:
        if self._enabled:
            print(line, file=self._out or sys.stderr, flush=True)
