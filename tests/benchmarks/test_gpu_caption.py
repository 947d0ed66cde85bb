"""benchmarks/gpu_caption.py at its reduced size on the CPU: every row, ratio and goal line is produced."""

from __future__ import annotations

import json

from benchmarks import gpu_caption
from tests.models.parts import one_thread


def test_the_benchmark_runs_at_reduced_size(tmp_path, capsys):
    with one_thread():
        assert (
            gpu_caption.main(
                [
                    "--size",
                    "small",
                    "--device",
                    "cpu",
                    "--batches",
                    "1,2",
                    "--repeats",
                    "1",
                    "--models",
                    "msmedcap,blip2",
                    "--out",
                    str(tmp_path),
                ]
            )
            == 0
        )
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "gpu_caption.json").read_text())
    rows = results["rows"]
    assert {(r["model"], r["preset"], r["batch"]) for r in rows} == {
        (m, p, b) for m in ("MSMedCap", "BLIP-2") for p in ("fast", "paper") for b in (1, 2)
    }
    for row in rows:
        assert row["images_per_s"] > 0 and row["p95_ms"] >= row["p50_ms"] > 0 and 0 < row["of_ideal"]
        assert (row["vs_generate"] is not None) == (row["preset"] == "fast")
        assert row["same_as_generate"] == (1.0 if row["preset"] == "fast" else None)  # fp32 on the CPU: token for token
        assert row["new_tokens"] == (40 if row["preset"] == "fast" else 50)  # random weights never stop early
    assert "| MSMedCap | fast | 2 |" in printed and "| vs generate | of ideal |" in printed and "% same)" in printed
    assert (tmp_path / "gpu_caption.md").read_text() in printed + "\n"


def test_the_full_configuration_is_the_4_13_b_parameter_model():
    from models import weights
    from models.msmedcap.model import MedCapModel

    with weights.empty_weights():
        model = MedCapModel(gpu_caption.full_config("msmedcap"))
    total = sum(p.numel() for p in model.parameters())
    # 4.13 B with the Q-Formers' text side; the inference model leaves it out.
    assert 3.9e9 < total < 4.13e9 and [(v.name, v.size) for v in model.config.views] == [("clip", 364), ("sam", 1024)]
    assert model.lm.config.hidden_size == 2560 and model.encoders["clip"].model.config.num_hidden_layers == 39
