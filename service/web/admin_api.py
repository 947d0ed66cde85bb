"""The admins' JSON API (``/api/admin``): the same as the admin pages, for programs. Admin role only;
send ``X-CSRF-Token`` (from ``/api/me``) on every POST. Searches of the audit trail are audited."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field

from service import audit_queries as aq
from service import routing
from service.audit import Action, web_actor
from service.reports import RequeueError, retry_job
from service.users import UserError
from service.web.admin_actions import audit_search, not_yourself, resend
from service.web.auth import SignedIn
from service.web.context import Admin, Context, WebContext, audit_event, require_csrf

router = APIRouter(tags=["admin"])


class AdminOverview(BaseModel):
    counts: aq.Overview
    failed: list[aq.FailedWork]
    skipped: list[routing.SkippedSeries] = Field(default_factory=list, description="the latest series the routing rules skipped")


class AuditPage(BaseModel):
    events: list[aq.AuditRow]
    more: bool = Field(description="more events match: ask again with offset + limit")
    limit: int
    offset: int


class Stats(BaseModel):
    since: datetime | None
    until: datetime | None
    turnaround: list[aq.TurnaroundStats]
    quality: list[aq.ModelQuality]


class Resend(BaseModel):
    destination: str | None = Field(
        None, description="AE@host:port of a dispatch of this SR (or a configured one); default: the configured destinations"
    )


class Queued(BaseModel):
    queued: list[str]


class UserOut(BaseModel):
    username: str
    display_name: str
    role: str
    disabled: bool


class NewUser(BaseModel):
    username: str
    display_name: str = Field(description="DICOM person name, Family^Given")
    role: str = Field(description="radiologist or admin")
    password: str


class NewPassword(BaseModel):
    password: str


def _window(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    try:
        return aq.parse_time(since), aq.parse_time(until, end=True)
    except aq.QueryError as exc:
        raise HTTPException(400, str(exc)) from None


def _user_error(exc: UserError) -> HTTPException:
    message = str(exc)
    return HTTPException(409 if "exists already" in message else 404 if message.startswith("there is no user") else 400, message)


@router.get("/overview", response_model=AdminOverview)
def overview(ctx: Context, who: Admin) -> AdminOverview:
    with ctx.db.session() as s:
        skipped = routing.recent_skips(s, limit=50)
    return AdminOverview(counts=aq.overview(ctx.db, ctx.clock.now()), failed=aq.failed_work(ctx.db), skipped=skipped)


@router.get("/failed", response_model=list[aq.FailedWork])
def failed(ctx: Context, who: Admin, limit: Annotated[int, Query(ge=1, le=10_000)] = 200) -> list[aq.FailedWork]:
    return aq.failed_work(ctx.db, limit=limit)


@router.get("/audit", response_model=AuditPage)
def audit(
    request: Request,
    ctx: Context,
    who: Admin,
    study: str | None = None,
    accession: str | None = None,
    patient: str | None = None,
    user: str | None = None,
    action: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: Annotated[int, Query(ge=1, le=aq.MAX_ROWS)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> AuditPage:
    """Audit events, newest first. ``since``/``until``: YYYY-MM-DD (``until`` through that day) or ISO times, UTC unless zoned."""
    params = {"study": study, "accession": accession, "patient": patient, "user": user, "action": action, "since": since, "until": until}
    try:
        search = audit_search(params, limit=limit, offset=offset)
    except aq.QueryError as exc:
        raise HTTPException(400, str(exc)) from None
    page = aq.search_audit(ctx.db, search)
    audit_event(request, Action.AUDIT_SEARCHED, "audit", "events", filters=search.filters(), offset=offset, shown=len(page.rows), api=True)
    return AuditPage(events=page.rows, more=page.more, limit=limit, offset=offset)


@router.get("/stats", response_model=Stats)
def stats(ctx: Context, who: Admin, since: str | None = None, until: str | None = None) -> Stats:
    """Turnaround (studies received in the window) and draft quality (drafts written in it), per model version."""
    start, end = _window(since, until)
    return Stats(
        since=start,
        until=end,
        turnaround=aq.turnaround_by_model(ctx.db, since=start, until=end),
        quality=aq.model_quality(ctx.db, since=start, until=end),
    )


@router.get("/turnaround", response_model=list[aq.StudyTurnaround])
def turnaround(
    ctx: Context,
    who: Admin,
    since: str | None = None,
    until: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[aq.StudyTurnaround]:
    """Per study, newest received first: received, drafted, approved."""
    start, end = _window(since, until)
    return aq.study_turnaround(ctx.db, since=start, until=end, limit=limit, offset=offset)


@router.post("/jobs/{job_id}/retry", status_code=204)
async def retry(request: Request, ctx: Context, who: Admin, job_id: int) -> Response:
    await require_csrf(request, who)
    try:
        retry_job(ctx.db, ctx.clock, job_id, web_actor(who.account.username))
    except RequeueError as exc:
        raise HTTPException(404 if str(exc).startswith("there is no") else 409, str(exc)) from None
    return Response(status_code=204)


@router.post("/reports/{sr_uid}/resend", response_model=Queued)
async def resend_report(request: Request, ctx: Context, who: Admin, sr_uid: str, body: Resend | None = None) -> Queued:
    await require_csrf(request, who)
    try:
        return Queued(queued=resend(ctx, who, sr_uid, body.destination if body else None))
    except RequeueError as exc:
        raise HTTPException(404 if str(exc).startswith("there is no") else 409, str(exc)) from None


@router.get("/users", response_model=list[UserOut])
def users(ctx: Context, who: Admin) -> list[UserOut]:
    return [UserOut(username=a.username, display_name=a.display_name, role=a.role.value, disabled=d) for a, d in ctx.users.list()]


@router.post("/users", response_model=UserOut, status_code=201)
async def add_user(request: Request, ctx: Context, who: Admin, body: NewUser) -> UserOut:
    await require_csrf(request, who)
    try:
        account = ctx.users.add(body.username, body.display_name, body.role, body.password, web_actor(who.account.username))
    except UserError as exc:
        raise _user_error(exc) from None
    return UserOut(username=account.username, display_name=account.display_name, role=account.role.value, disabled=False)


@router.post("/users/{username}/disable", status_code=204)
async def disable_user(request: Request, ctx: Context, who: Admin, username: str) -> Response:
    return await _set_disabled(request, ctx, who, username, True)


@router.post("/users/{username}/enable", status_code=204)
async def enable_user(request: Request, ctx: Context, who: Admin, username: str) -> Response:
    return await _set_disabled(request, ctx, who, username, False)


async def _set_disabled(request: Request, ctx: WebContext, who: SignedIn, username: str, disabled: bool) -> Response:
    await require_csrf(request, who)
    try:
        not_yourself(who, username, disabled)
        ctx.users.set_disabled(username, disabled, web_actor(who.account.username))
    except UserError as exc:
        raise _user_error(exc) from None
    return Response(status_code=204)


@router.post("/users/{username}/password", status_code=204)
async def reset_password(request: Request, ctx: Context, who: Admin, username: str, body: NewPassword) -> Response:
    await require_csrf(request, who)
    try:
        ctx.users.reset_password(username, body.password, web_actor(who.account.username))
    except UserError as exc:
        raise _user_error(exc) from None
    return Response(status_code=204)
