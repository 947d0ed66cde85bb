"""benchmarks/model_memory.py on tiny configurations: every step runs in its own process and is reported."""

from __future__ import annotations

import pytest

from benchmarks import model_memory

pytestmark = pytest.mark.processes  # every step of the benchmark is a process of its own


def test_the_benchmark_runs_at_tiny_size(tmp_path, capsys):
    assert model_memory.main(["--size", "tiny", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "memory.md")]) == 0
    table = (tmp_path / "memory.md").read_text()
    for _, label in model_memory.STEPS:
        assert f"| {label} |" in table
    assert "goal load <= 1.3x bf16 checkpoint" in table and "goal compose fits 32 GB: MET" in table
    # what the steps wrote is real: a training and an inference checkpoint
    assert (tmp_path / "work" / "train" / "config.json").is_file() and (tmp_path / "work" / "inference" / "MODEL_CARD.md").is_file()
