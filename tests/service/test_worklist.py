"""The worklist on a known history (tests/migrations/audit_data.py), both database backends: the
count per state comes from one grouped query and agrees with the rows each state lists."""

from __future__ import annotations

from datetime import date

import pytest

from service.review import ReviewState
from service.worklist import WorklistFilter, list_drafts
from tests.conftest import sql_statements
from tests.migrations.audit_data import populate


@pytest.mark.parametrize(
    "filters, expected",
    [
        ({}, {"awaiting review": 1, "approved": 3, "rejected": 1, "superseded": 1}),
        ({"search": "doe"}, {"awaiting review": 0, "approved": 1, "rejected": 1, "superseded": 0}),
        ({"modality": "MR"}, {"awaiting review": 0, "approved": 0, "rejected": 0, "superseded": 0}),
        ({"received_to": date(2025, 12, 31)}, {"awaiting review": 0, "approved": 0, "rejected": 0, "superseded": 0}),
    ],
    ids=["all", "search", "no-match", "before-any"],
)
def test_the_counts_per_state_come_from_one_query_and_match_the_lists(db, filters, expected):
    populate(db)
    with sql_statements(db) as sent:
        rows, counts = list_drafts(db, WorklistFilter(state=ReviewState.AWAITING, **filters))
    assert counts == expected
    queries = [q for q in sent if q.lstrip().upper().startswith("SELECT")]  # not SQLite's BEGIN
    assert len(queries) == 3  # the counts, the page, the page's modalities (was one count per state, then two)
    assert sum("count(" in q.lower() for q in queries) == 1
    for state in ReviewState:  # each count is what that state's own list holds
        listed, _ = list_drafts(db, WorklistFilter(state=state, limit=1000, **filters))
        assert len(listed) == counts[state.value] and {r.state for r in listed} <= {state.value}
    assert len(rows) == expected["awaiting review"]
