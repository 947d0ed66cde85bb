"""The admin overview (page and /api/admin/overview) lists the series the routing rules skipped, with the rule's name."""

from __future__ import annotations

import re

import pydicom
import pytest

from service import routing
from tests.pipeline import CT, runner
from tests.service.web.conftest import sign_in
from workers.drafting import Drafter, DraftOptions


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_overview_lists_skipped_series_with_their_rule(client, accounts, db, clock, settings, captioner, job_id):
    sign_in(client, "root")
    assert "No series has been skipped." in client.get("/admin").text
    rules = routing.parse("[[rules]]\nname = 'no-ct-today'\naction = 'skip'\nmodality = 'CT'\n", source="site.toml")
    options = DraftOptions(storage=settings.storage, routing=rules)
    assert runner(db, clock).run(job_id, Drafter(db, clock, captioner, options, "worker:test").draft) == "succeeded"

    page = client.get("/admin").text
    series = str(pydicom.dcmread(CT[0], stop_before_pixels=True).SeriesInstanceUID)
    (row,) = re.findall(r'<tr data-rule="no-ct-today">(.*?)</tr>', page, flags=re.S)
    assert series in row and "skipped by rule no-ct-today" in row and " v1<" in row
    assert "No series has been skipped." not in page
    (skipped,) = client.get("/api/admin/overview").json()["skipped"]
    assert (skipped["series_uid"], skipped["rule"], skipped["study_version"]) == (series, "no-ct-today", 1)
