import io

import pytest

from models.progress import Stage, StageProgress, clock_text


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stage_lines_count_the_stages_and_estimate_the_time_left_from_the_steps_done():
    clock, out = Clock(), io.StringIO()
    progress = StageProgress([Stage("data", 0), Stage("lm", 100), Stage("stage 1", 200), Stage("stage 2", 300)], out=out, clock=clock)
    progress.start("data")
    clock.now += 5  # no steps: says nothing about the rate
    progress.start("lm")
    clock.now += 50  # 100 steps in 50 s: 0.5 s a step
    progress.start("stage 1")
    clock.now += 100  # 200 more in 100 s
    progress.start("stage 2")
    clock.now += 150
    progress.done()
    assert out.getvalue().splitlines() == [
        "stage 1/4 data, elapsed 00:00, ETA estimating (after the first training stage)",
        "stage 2/4 lm (100 steps), elapsed 00:05, ETA estimating (after the first training stage)",
        "stage 3/4 stage 1 (200 steps), elapsed 00:55, ETA 04:10",  # 500 steps left at 0.5 s
        "stage 4/4 stage 2 (300 steps), elapsed 02:35, ETA 02:30",
        "all 4 stages done in 05:05",
    ]


def test_eta_follows_the_measured_rate():
    clock = Clock()
    progress = StageProgress([Stage("a", 10), Stage("b", 30)], out=io.StringIO(), clock=clock)
    progress.start("a")
    assert progress.eta_seconds() is None
    clock.now += 20  # 2 s a step
    progress.start("b")
    assert progress.eta_seconds() == pytest.approx(60.0)


def test_eta_weighs_each_stages_steps_by_their_cost():
    clock = Clock()
    progress = StageProgress([Stage("cheap", 100, weight=0.1), Stage("dear", 50)], out=io.StringIO(), clock=clock)
    progress.start("cheap")
    clock.now += 10  # 100 steps of weight 0.1: 1 s a unit of work
    progress.start("dear")
    assert progress.eta_seconds() == pytest.approx(50.0)
    with pytest.raises(ValueError, match="Stage.weight"):
        Stage("x", 1, weight=0)


def test_stages_out_of_order_and_bad_stages_are_refused_naming_the_field():
    progress = StageProgress([Stage("a", 1), Stage("b", 1)], out=io.StringIO())
    with pytest.raises(ValueError, match="'b' out of order; expected 'a'"):
        progress.start("b")
    with pytest.raises(ValueError, match="Stage.steps"):
        Stage("x", -1)
    with pytest.raises(ValueError, match="Stage.name"):
        Stage("", 1)
    with pytest.raises(ValueError, match="StageProgress.stages"):
        StageProgress([])


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    progress = StageProgress([Stage("a", 1)], out=out, enabled=False)
    progress.start("a")
    progress.done()
    assert out.getvalue() == ""


def test_clock_text():
    assert clock_text(0) == "00:00" and clock_text(61.4) == "01:01" and clock_text(3725) == "1:02:05"
