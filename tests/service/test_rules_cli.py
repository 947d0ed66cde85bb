"""``medcap rules check`` and ``medcap rules explain``, and start-up refusing a broken rule file: run
in this process through ``service.cli.main`` (no broker, no model needed), against a real database."""

from __future__ import annotations

import json

import pydicom
import pytest

from service import cli
from tests.conftest import storescu
from tests.pipeline import CT
from tests.processes import settings_env

RULES = """
[[rules]]
name = "scouts"
action = "skip"
series_description = "scout"

[[rules]]
name = "from-pacs1"
calling_ae = "PACS1"
modality = ["CT", "MR"]
body_region = "HEAD"
destinations = ["HEADPACS@127.0.0.1:4243"]
"""


@pytest.fixture
def medcap(settings, monkeypatch, capsys):
    """Run ``medcap ARGS`` in this process with ``settings`` in the environment: (exit code, stdout, stderr)."""
    for key, value in settings_env(settings).items():
        if key.startswith("MEDCAP_"):
            monkeypatch.setenv(key, value)

    def run(*args: str, **env: str | None) -> tuple[int, str, str]:
        for key, value in env.items():
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)
        code = cli.main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_rules_check_prints_a_valid_file_in_order(medcap, tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(RULES)
    code, out, err = medcap("rules", "check", str(path))
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"{path}: 2 rule(s), valid",
        "  1. scouts: series_description=/scout/ -> skip",
        "  2. from-pacs1: modality=CT,MR body_region=HEAD calling_ae=PACS1 -> caption with default, SR to HEADPACS@127.0.0.1:4243",
        "  a series no rule matches is skipped",
    ]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_rules_check_names_the_rule_and_field_of_an_error(medcap, tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(RULES.replace('series_description = "scout"', 'series_description = "scout("'))
    code, out, err = medcap("rules", "check", str(path))
    assert code == 1 and out == ""
    assert err.startswith(f"medcap: {path}: rule 'scouts': series_description: is not a valid regular expression")
    path.write_text(RULES.replace("HEADPACS@127.0.0.1:4243", "fhir-server"))
    code, _, err = medcap("rules", "check", str(path))
    assert code == 1 and "rule 'from-pacs1': destinations: destination 'fhir-server' is not one of any output kind's" in err
    code, _, err = medcap("rules", "check", str(tmp_path / "nope.toml"))
    assert code == 1 and "cannot read the rule file" in err


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_start_up_refuses_a_broken_rule_file_naming_the_rule_and_field(medcap, tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text('[[rules]]\nname = "a"\nmin_instances = "ten"\n')
    code, _, err = medcap("listen", MEDCAP_ROUTING_RULES=str(path))
    assert code == 1
    assert err.strip() == f"medcap: MEDCAP_ROUTING_RULES: {path}: rule 'a': min_instances: must be a whole number of at least 0, got 'ten'"


@pytest.mark.peers
def test_rules_explain_shows_each_series_decision_and_why_the_other_rules_did_not_match(medcap, listener, tmp_path):
    study = str(pydicom.dcmread(CT[0], stop_before_pixels=True).StudyInstanceUID)
    series = str(pydicom.dcmread(CT[0], stop_before_pixels=True).SeriesInstanceUID)
    code, _, err = medcap("rules", "explain", study)
    assert code == 1 and f"no study {study} has been received" in err
    assert storescu(listener, CT, calling="PACS1").returncode == 0

    path = tmp_path / "rules.toml"
    path.write_text(RULES)
    code, out, err = medcap("rules", "explain", study, MEDCAP_ROUTING_RULES=str(path))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:2] == [f"study {study}, not yet assembled (every received instance)", f"rules: {path}"]
    assert f"series {series}: CT, {len(CT)} instances, series description None, body region HEAD, from PACS1" in out
    assert "  decision: caption with model default (captioned by rule from-pacs1)" in lines
    assert "     scouts: did not match: series_description: the series has none" in lines
    assert "  -> from-pacs1: matched" in lines

    code, out, _ = medcap("rules", "explain", study, "--json", MEDCAP_ROUTING_RULES=None)  # the built-in default
    explained = json.loads(out)
    assert code == 0 and explained["rules"] == "built-in default"
    (only,) = explained["series"]
    assert only["decision"] == {"rule": "default", "action": "caption", "model": "default", "reason": "captioned by rule default"}
    assert only["facts"]["calling_ae_titles"] == ["PACS1"] and only["facts"]["instance_count"] == len(CT)
