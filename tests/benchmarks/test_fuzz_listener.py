"""benchmarks/fuzz_listener.py's short seeded tier: ~100 malformed datasets and PDUs against `medcap listen`."""

from __future__ import annotations

import json

import pytest

from benchmarks import fuzz_listener

pytestmark = pytest.mark.processes  # the listener runs as `medcap listen`, a process of its own


def test_the_short_seeded_tier_meets_every_goal(tmp_path, capsys):
    report_path = tmp_path / "fuzz.json"
    status = fuzz_listener.main(
        ["--seed", "12", "--datasets", "60", "--pdus", "60", "--health-interval", "0.3", "--json", str(report_path)]
    )
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["dataset_cases"] == 60 and report["pdu_cases"] == 60
    assert report["health_attempted"] >= 10, out
    assert status == 0, out
    assert report["crashes"] == 0 and report["success_on_malformed"] == 0 and report["orphan_files"] == 0
    assert report["facts"]["instance_rows"] == report["facts"]["instance_files"] == report["health_served"] + 3  # + warm-up stores
