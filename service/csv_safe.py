"""CSV cells that a spreadsheet shows as text, never runs as a formula.

Audit rows, patient names, AE titles, user names and report texts come from outside (a sign-in
form needs no account, a PACS sends any PatientID): a cell starting with ``=``, ``+``, ``-``, ``@``
or a control character becomes a formula in Excel or LibreOffice (OWASP "CSV injection"). Every
CSV MedCap writes goes through :func:`cell` (or :func:`row`), which prefixes such text with ``'``,
the spreadsheets' own "this is text" mark. A cell that already starts with ``'`` is prefixed too,
so :func:`restore` gives back exactly what was written.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

FORMULA_STARTS = frozenset("=+-@\t\r\n'")


def cell(value: Any) -> Any:
    """``value`` as it may go into a CSV cell: text starting with a formula character gets a ``'``."""
    if isinstance(value, str) and value[:1] in FORMULA_STARTS:
        return "'" + value
    return value


def row(values: Iterable[Any]) -> list[Any]:
    return [cell(v) for v in values]


def restore(text: str) -> str:
    """The text :func:`cell` was given (for programs that read back a CSV MedCap wrote)."""
    return text[1:] if text[:1] == "'" and text[1:2] in FORMULA_STARTS else text
