"""The README documents what the code does."""

import re
from pathlib import Path

from service.cli import build_parser
from service.settings import ENV_PREFIX, Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_documented():
    documented = set(re.findall(r"`(MEDCAP_[A-Z0-9_]+)`", README))  # digits: MEDCAP_HL7_*
    expected = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    assert expected - documented == set()


def test_the_settings_table_has_a_row_for_each_setting_and_no_other():
    rows = re.findall(r"^\| `(MEDCAP_[A-Z0-9_]+)` \|", README, flags=re.M)
    expected = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    assert sorted(rows) == sorted(expected)  # each once


def test_every_command_is_documented():
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in commands:
        assert f"medcap [--config FILE] {name}" in README


def test_exactly_two_setup_commands():
    section = README.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^    (scripts/\w+)", section, flags=re.M) == ["scripts/run", "scripts/test"]
