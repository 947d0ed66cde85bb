"""Captioning real DICOM offline: ``Captioner`` and ``medcap caption`` with a tiny checkpoint."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dicom_io.image_views import ImageView
from dicom_io.model_input import prepare_series
from models import checkpoint
from models.captioner import Captioner, summarise
from tests.conftest import shared_data
from tests.processes import run


def test_captions_are_deterministic_and_independent_of_batching(tiny_model):
    captioner = Captioner.load(tiny_model, "cpu")
    assert captioner.views == (ImageView("clip", 64, "clip"), ImageView("sam", 64, "sam"))
    (series,) = prepare_series(shared_data("ct-head-ge"), views=captioner.views)
    inputs = dict(series.views)
    one_by_one = captioner.caption(inputs, batch_size=1)
    assert one_by_one == captioner.caption(inputs, batch_size=3) == captioner.caption(inputs, batch_size=3)
    assert len(one_by_one) == len(series.sop_instance_uids) == 3
    assert captioner.describe()["weights_sha256"] == checkpoint.sha256_file(tiny_model / "model.safetensors")


def test_inputs_are_checked(tiny_model):
    captioner = Captioner.load(tiny_model, "cpu")
    with pytest.raises(ValueError, match="missing"):
        captioner.caption({"clip": np.zeros((1, 3, 64, 64), np.float32)})
    with pytest.raises(ValueError, match="disagree"):
        captioner.caption({"clip": np.zeros((1, 3, 64, 64), np.float32), "sam": np.zeros((2, 3, 64, 64), np.float32)})


def test_summary_keeps_distinct_sentences_in_order():
    assert (
        summarise(["axial ct of the head. no focal lesion.", "axial ct of the head. small lesion."])
        == "axial ct of the head. no focal lesion. small lesion."
    )


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MEDCAP_") or k.startswith("MEDCAP_TEST_")}


@pytest.mark.processes
def test_medcap_caption_command_on_a_study_folder(tiny_model):
    env = _env()
    result = run(["caption", str(shared_data()), "--model", str(tiny_model), "--json"], env, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["status"].startswith("PRELIMINARY")
    assert {s["modality"] for s in report["series"]} == {"CT", "MR"} and len(report["series"]) == 3
    for series in report["series"]:
        assert len(series["key_images"]) == 3 and series["draft"]
    text = run(["caption", str(shared_data("mr-t1-brain-uih")), "--model", str(tiny_model)], env, timeout=300)
    assert text.returncode == 0 and "AI draft — preliminary, unverified" in text.stdout


@pytest.mark.processes
def test_medcap_caption_explains_a_missing_model():
    result = run(["caption", str(shared_data("ct-head-ge"))], _env(), timeout=120)
    assert result.returncode == 1 and "no model: pass --model DIR or set MEDCAP_MODEL" in result.stderr
