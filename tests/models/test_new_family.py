"""A new captioner family is one module plus its registration: compose, load and caption real DICOM
through the unchanged commands, with a view no other family reads."""

from __future__ import annotations

import json
import os

import pytest

from dicom_io.image_views import ImageView, view_array
from dicom_io.intensity import unit_images
from dicom_io.key_slices import KeySliceSpec, select_key_slices
from dicom_io.series import read_series
from models import families
from models.captioner import Captioner
from service.cli import main
from tests.conftest import series_files, shared_data
from tests.models import brightness_family

WORDS = ["black", "dark", "grey", "light", "white"]


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(families.REGISTRY, "brightness", brightness_family.REGISTRATION)
    for name in [k for k in os.environ if k.startswith("MEDCAP_") and not k.startswith("MEDCAP_TEST_")]:
        monkeypatch.delenv(name)  # the operator's settings (MEDCAP_MODEL ...) are not this test's


def test_a_registered_family_composes_loads_and_captions_dicom_through_the_commands(registered, tmp_path, capsys):
    out = tmp_path / "brightness"
    assert main(["model", "compose", "--model-type", "brightness", "--words", ",".join(WORDS), "--view-size", "24", "--out", str(out)]) == 0
    captioner = Captioner.load(out, "cpu")
    assert captioner.identity.model_type == "brightness" and captioner.views == (ImageView("unit", 24, "unit"),)
    capsys.readouterr()

    assert main(["caption", str(shared_data("ct-head-ge")), "--model", str(out), "--json", "--device", "cpu", "--key-slices", "3"]) == 0
    (drafted,) = json.loads(capsys.readouterr().out)["series"]
    # what the model must have seen: each key image as the 24 px unit view, nothing else
    series = read_series(series_files("ct-head-ge"))[0]
    indices = select_key_slices(series, KeySliceSpec("uniform", 3)).indices
    means = [float(view_array(ImageView("unit", 24, "unit"), image)[0].mean()) for image in unit_images(series, indices)]
    expected = [f"{WORDS[min(int(m * len(WORDS)), len(WORDS) - 1)]} image, 24 px" for m in means]
    assert [k["caption"] for k in drafted["key_images"]] == expected
    assert all(0 < m < 1 for m in means)  # real images, not blank ones: the words depend on the pixels


def test_compose_checks_the_flags_the_registration_declares(registered, tmp_path, capsys):
    assert main(["model", "compose", "--model-type", "brightness", "--out", str(tmp_path / "x")]) == 1
    assert "model compose --model-type brightness needs --words" in capsys.readouterr().err
    assert (
        main(["model", "compose", "--model-type", "brightness", "--words", "a", "--clip", "openai/clip", "--out", str(tmp_path / "x")]) == 1
    )
    assert "model compose --model-type brightness does not read --clip" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unregistered_it_is_unknown(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["model", "compose", "--model-type", "brightness", "--words", "a", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'brightness'" in capsys.readouterr().err
    with pytest.raises(families.UnknownModelType, match="'brightness' is not one of"):
        families.family("brightness")
