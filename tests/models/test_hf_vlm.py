"""hf-vlm: tiny randomly initialised image-text-to-text models of two architectures (LLaVA, Gemma 3),
built here and composed offline, run through ``medcap model compose`` and ``medcap caption``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

import models.hf_vlm as hf_vlm
from dicom_io.image_views import ImageView
from models.batching import CaptionBatcher
from models.captioner import Captioner
from models.config import ConfigError
from models.hf_vlm import DEFAULT_PROMPT, HfVlmConfig, VlmProcessor, prompt_text, run_dtype
from service.cli import main
from tests.conftest import shared_data
from tests.models.tiny_vlms import TINY_VLMS

ARCHITECTURES = sorted(TINY_VLMS)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def composed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(architecture, the hub-style source directory, the MedCap checkpoint composed from it by the command)."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    source = TINY_VLMS[arch](root / f"tiny-{arch}")
    out = root / "ckpt"
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in __import__("os").environ if k.startswith("MEDCAP_") and not k.startswith("MEDCAP_TEST_")]:
            mp.delenv(name)
        assert main(["model", "compose", "--model-type", "hf-vlm", "--vlm", str(source), "--max-images", "2", "--out", str(out)]) == 0
    return arch, source, out


def test_compose_keeps_every_weight_of_the_source_and_names_it(composed):
    arch, source, out = composed
    captioner = Captioner.load(out, "cpu")
    reference = AutoModelForImageTextToText.from_pretrained(source)
    ours, theirs = captioner.model.vlm.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)  # every weight as the source has it, none random
    identity = captioner.identity
    assert (identity.name, identity.model_type) == (f"tiny-{arch}", "hf-vlm") and len(identity.weights_sha256) == 64
    assert captioner.views == (ImageView("vlm", 512, "unit"),) and captioner.reads_series
    assert next(captioner.model.parameters()).dtype == torch.float32  # CPU: fp32
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["sources"][0]["source"] == str(source) and len(provenance["sources"][0]["sha256"]) == 64
    assert f"`{captioner.model.config.hf_config['model_type']}` image-text-to-text model" in (out / "MODEL_CARD.md").read_text()


def test_caption_reads_each_series_key_images_together_with_its_header_facts(composed, capsys, monkeypatch):
    arch, _, out = composed
    prompts: list[tuple[str, int]] = []

    def recording(template: str, facts: str, images: int) -> str:
        prompts.append((facts, images))
        return prompt_text(template, facts, images)

    monkeypatch.setattr(hf_vlm, "prompt_text", recording)
    capsys.readouterr()
    args = ["caption", str(shared_data("ct-head-ge")), "--model", str(out), "--json", "--device", "cpu", "--key-slices", "3"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    (series,) = report["series"]
    assert report["model"]["type"] == "hf-vlm" and report["model"]["name"] == f"tiny-{arch}"
    # three key images, at most two per prompt: two prompts, each carrying the series' header facts
    assert [images for _, images in prompts] == [2, 1]
    assert all(facts.startswith("DICOM header: CT head, axial.") for facts, _ in prompts)
    captions = [k["caption"] for k in series["key_images"]]
    assert len(captions) == 3 and captions[0] == captions[1]  # the first two were read by one prompt
    assert series["draft"].startswith("CT head, axial:")  # the heading is the header's, whatever the model wrote
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["series"] == report["series"]  # deterministic


def test_batches_of_prompts_give_the_texts_one_prompt_at_a_time_gives(composed):
    _, _, out = composed
    captioner = Captioner.load(out, "cpu")
    rng = np.random.default_rng(0)
    series = [({"vlm": rng.random((n, 3, 512, 512), dtype=np.float32)}, f"DICOM header: CT head, axial. ({n})") for n in (3, 1, 2)]
    one_by_one = captioner.caption_series(series, batch_size=1)
    assert [len(c) for c in one_by_one] == [3, 1, 2] and one_by_one[0][0] == one_by_one[0][1]
    assert captioner.caption_series(series, batch_size=8) == one_by_one  # left padding: batching changes nothing
    batcher = CaptionBatcher(captioner, max_images=8, max_wait_ms=0)
    assert batcher.reads_series and batcher.caption_series(series, batch_size=8) == one_by_one
    # an image alone (medcap evaluate's images have no header): one caption each, through the common interface
    assert len(captioner.caption({"vlm": series[0][0]["vlm"]}, "fast")) == 3
    with pytest.raises(ValueError, match="a prompt carries 1 to 2 images, got 3"):
        captioner.model.generate_series_captions(
            [(torch.zeros(3, 3, 8, 8), "")], captioner.text, __import__("models.generation").generation.preset("fast")
        )


def test_config_and_processor_checks_name_the_field(composed):
    _, source, out = composed
    values = json.loads((out / "config.json").read_text())
    for change, message in (
        ({"max_images": 0}, "max_images: must be at least 1"),
        ({"prompt_template": "{facts} {series}"}, "prompt_template: only {facts} and {images}"),
        ({"hf_config": {}}, "hf_config: must be a transformers config"),
        ({"name": "x" * 65}, "name: at most 64 characters"),
    ):
        with pytest.raises(ConfigError, match=message):
            HfVlmConfig.from_dict(values | change)
    processor = VlmProcessor.load(out).processor
    processor.chat_template = None
    with pytest.raises(ConfigError, match="the processor has no chat template"):
        VlmProcessor(processor)
    assert "{facts}" in DEFAULT_PROMPT and prompt_text(DEFAULT_PROMPT, "", 1).startswith("These are 1 key image(s)")


def test_compose_refuses_what_is_not_an_image_text_to_text_model(tmp_path, capsys):
    assert main(["model", "compose", "--model-type", "hf-vlm", "--out", str(tmp_path / "x")]) == 1
    assert "needs --vlm" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["model", "compose", "--model-type", "hf-vlm", "--vlm", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 1
    assert "--vlm" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_bf16_on_gpus_that_compute_in_it_fp32_elsewhere():
    assert run_dtype(torch.device("cpu")) == torch.float32
    if torch.cuda.is_available():
        major = torch.cuda.get_device_capability()[0]
        assert run_dtype(torch.device("cuda")) == (torch.bfloat16 if major >= 8 else torch.float32)
