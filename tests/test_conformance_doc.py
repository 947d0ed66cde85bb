"""docs/conformance.md states what the code accepts: every SOP class and transfer syntax, and no other."""

import re
from pathlib import Path

from dicom_io.sop_classes import ACCEPTED, CAPTIONABLE, TRANSFER_SYNTAXES

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "conformance.md").read_text()


def table_rows(heading: str) -> list[list[str]]:
    section = DOC.split(heading, 1)[1].split("\n#", 1)[0]
    return [
        [c.strip().strip("`") for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if re.match(r"\| .+ \| `[\d.]+` \|", line)
    ]


def test_the_sop_class_table_is_the_accepted_set_and_says_which_are_captioned():
    rows = table_rows("## DICOM (DIMSE)")
    assert {r[1] for r in rows} == set(ACCEPTED) and len(rows) == len(ACCEPTED)
    assert {r[1] for r in rows if r[2] == "captioned"} == set(CAPTIONABLE)


def test_the_transfer_syntax_table_is_the_supported_list_in_order():
    assert [r[1] for r in table_rows("### Transfer syntaxes")] == list(TRANSFER_SYNTAXES)


def test_the_readme_links_the_statement_and_the_walk():
    readme = (ROOT / "README.md").read_text()
    assert "(docs/conformance.md)" in readme and "(docs/conformance.md#the-walk)" in readme
    assert "## The walk" in DOC and (ROOT / "tests" / "service" / "test_interop_walk.py").is_file()
