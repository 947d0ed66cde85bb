"""What the admin pages (admin.py) and the admin JSON API (admin_api.py) both do: parse an audit
search, queue an SR again (only to a destination it may go to), refuse disabling one's own account."""

from __future__ import annotations

from typing import Any

from service import audit_queries as aq
from service.audit import web_actor
from service.reports import RequeueError, resend_report
from service.users import UserError
from service.web.auth import SignedIn
from service.web.context import WebContext


def audit_search(params: dict[str, Any], *, limit: int, offset: int) -> aq.AuditSearch:
    """The search the query parameters ask for (raises aq.QueryError)."""

    def text(name: str) -> str | None:
        value = params.get(name)
        return (str(value).strip() or None) if value is not None else None

    return aq.AuditSearch(
        study_uid=text("study"),
        accession=text("accession"),
        patient=text("patient"),
        user=text("user"),
        action=text("action"),
        since=aq.parse_time(text("since")),
        until=aq.parse_time(text("until"), end=True),
        limit=limit,
        offset=offset,
    )


def allowed_destination(ctx: WebContext, sr_uid: str, destination: str) -> bool:
    """A resend may go where the SR was sent before, or to a configured destination; nowhere else."""
    configured = set(ctx.settings.dispatch_destinations)
    return destination in configured or destination in aq.sr_destinations(ctx.db, sr_uid)


def resend(ctx: WebContext, who: SignedIn, sr_uid: str, destination: str | None) -> list[str]:
    """Queue an SR again: to ``destination`` (a failed dispatch's), or to the configured destinations."""
    if destination:
        if not allowed_destination(ctx, sr_uid, destination):
            raise RequeueError(f"{destination} is neither a destination of SR {sr_uid} nor a configured one")
        destinations = [destination]
    else:
        destinations = list(ctx.settings.dispatch_destinations)
    return resend_report(ctx.db, ctx.clock, sr_uid, destinations, web_actor(who.account.username), kinds=ctx.reviews.outputs)


def not_yourself(who: SignedIn, username: str, disabled: bool) -> None:
    if disabled and username == who.account.username:
        raise UserError("you cannot disable your own account (another admin, or `medcap users disable`, can)")
