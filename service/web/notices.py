"""What a page says after a redirect: a code from the link mapped to a fixed text.

A link such as ``/drafts/7?notice=approved`` cannot make a page say anything its author chose
(issue 12, D13): the code picks one of the texts below, and the few values filled in are checked
against what they can be (a number, a UID, a user name, a role); an unknown code or a value that
does not fit shows nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlencode

_NUMBER = re.compile(r"[1-9][0-9]{0,17}")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_USERNAME = re.compile(r"[a-z][a-z0-9._-]{1,63}")
_ROLE = re.compile(r"radiologist|admin")

# code -> (text, {parameter: the form its value must have})
NOTICES: dict[str, tuple[str, dict[str, re.Pattern[str]]]] = {
    # after a decision the reviewer is on the next draft (or on this one, when none is left)
    "approved": ("Approved draft {draft}. Verified report {sr} is on its way to the PACS.", {"draft": _NUMBER, "sr": _UID}),
    "approved_last": (
        "Approved draft {draft}. Verified report {sr} is on its way to the PACS. No more drafts await review.",
        {"draft": _NUMBER, "sr": _UID},
    ),
    "rejected": ("Rejected draft {draft}.", {"draft": _NUMBER}),
    "queue_empty": ("No drafts await review.", {}),
    "rejected_last": ("Rejected draft {draft}. No more drafts await review.", {"draft": _NUMBER}),
    "job_retried": ("Job {job} is queued again.", {"job": _NUMBER}),
    "sr_resent": ("SR {sr} is queued again.", {"sr": _UID}),
    "user_added": ("User {user} added as {role}.", {"user": _USERNAME, "role": _ROLE}),
    "user_disabled": ("User {user} disabled: they can no longer sign in.", {"user": _USERNAME}),
    "user_enabled": ("User {user} enabled.", {"user": _USERNAME}),
    "password_changed": ("Password of {user} changed.", {"user": _USERNAME}),
}


def link(path: str, code: str, **values: str | int) -> str:
    """``path`` with the notice ``code`` (and its values) in the query."""
    _, fields = NOTICES[code]
    if set(values) != set(fields):
        raise ValueError(f"notice {code!r} takes {sorted(fields)}, not {sorted(values)}")
    return f"{path}?{urlencode({'notice': code, **{k: str(v) for k, v in values.items()}})}"


def text(query: Mapping[str, str]) -> str:
    """The text for a request's query (``notice`` and its values), or "" when there is none that fits."""
    found = NOTICES.get(query.get("notice", ""))
    if found is None:
        return ""
    template, fields = found
    values = {name: query.get(name, "") for name in fields}
    if not all(len(v) <= 64 and pattern.fullmatch(v) for (name, pattern), v in zip(fields.items(), values.values(), strict=True)):
        return ""
    return template.format(**values)
