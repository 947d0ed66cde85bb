"""Every CSV MedCap writes shows outside text as text: no formula runs in a spreadsheet."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

import pytest

from models.datasets import read_table
from service import audit, csv_safe
from service.audit import Action
from service.cli import main
from service.feedback import COLUMNS
from tests.processes import settings_env

ATTACKS = ['=HYPERLINK("http://x","y")', "+1+2", "-2+3", "@SUM(A1)", "\t=1", "\r=1", "'=1"]


@pytest.mark.parametrize("text", ATTACKS)
def test_formula_text_gets_a_quote_and_comes_back(text):
    safe = csv_safe.cell(text)
    assert safe == "'" + text
    assert csv_safe.restore(safe) == text


def test_plain_values_are_left_alone():
    assert csv_safe.row(["Smith^Jane", 3, -2, 1.5, None, "", "1.2.840"]) == ["Smith^Jane", 3, -2, 1.5, None, "", "1.2.840"]
    assert csv_safe.restore("'quoted") == "'quoted"


def test_medcap_audit_search_csv_neutralises_what_strangers_typed(db, settings, monkeypatch, capsys):
    # A sign-in needs no account: the user name typed into the form is the audit row's object.
    with db.session() as s:
        audit.record(s, datetime(2026, 1, 2, tzinfo=UTC), "web:10.0.0.9", Action.LOGIN_FAILED, "user", '=HYPERLINK("http://evil","x")')
        audit.record(s, datetime(2026, 1, 2, tzinfo=UTC), "dicom:@EVIL@10.0.0.9", Action.ASSOCIATION_REJECTED, "association", "-1+1")
    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    assert main(["audit", "search", "--csv"]) == 0
    table = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    cells = [cell for row in table[1:] for cell in row]
    assert '\'=HYPERLINK("http://evil","x")' in cells and "'dicom:@EVIL@10.0.0.9" not in cells
    assert "'-1+1" in cells
    assert not any(cell and cell[0] in "=+-@\t\r" for cell in cells)


def test_a_neutralised_feedback_caption_is_read_back_as_written(tmp_path):
    caption = "- 3 mm nodule, right lower lobe"
    (tmp_path / "a.png").write_bytes(b"")
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerow({key: csv_safe.cell(value) for key, value in {"image": "a.png", "caption": caption, "split": "train"}.items()})
    (tmp_path / "table.csv").write_text(out.getvalue())
    assert "'- 3 mm" in out.getvalue()
    (record,) = read_table(tmp_path / "table.csv")
    assert record.caption == caption
