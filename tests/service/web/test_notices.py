"""A redirect's notice is a code mapped to a fixed text; the link supplies only checked values."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import pytest

from service.web import notices


def query_of(link: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(link).query))


def test_a_link_made_here_reads_back_as_its_text():
    assert notices.text(query_of(notices.link("/admin", "job_retried", job=12))) == "Job 12 is queued again."
    added = notices.link("/admin/users", "user_added", user="smith", role="radiologist")
    assert notices.text(query_of(added)) == "User smith added as radiologist."
    assert notices.text({"notice": "rejected", "draft": "7"}) == "Rejected draft 7."
    assert notices.text({"notice": "rejected", "draft": "seven"}) == ""


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"message": "Call the help desk on 555-0100"},
        {"notice": "Call the help desk on 555-0100"},
        {"notice": "job_retried", "job": "12; call 555"},
        {"notice": "job_retried"},
        {"notice": "user_added", "user": "smith", "role": "superuser"},
        {"notice": "user_disabled", "user": "<script>alert(1)</script>"},
        {"notice": "sr_resent", "sr": "1" * 65},
    ],
)
def test_anything_else_shows_nothing(query):
    assert notices.text(query) == ""


def test_a_notice_is_made_with_exactly_its_values():
    with pytest.raises(ValueError, match="takes"):
        notices.link("/admin", "job_retried")
    with pytest.raises(KeyError):
        notices.link("/admin", "anything")
