"""The admins' pages: overview with failed work (retry, resend), the audit trail (search, CSV), report
statistics per model version, and users. Admin role only; every POST carries the session's CSRF token.

Retry and resend only queue the work again (service/reports.py, audited there as the signed-in
admin); the assembler publishes it, as after ``medcap retry`` / ``medcap resend``.
"""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from service import audit_queries as aq
from service import routing
from service.audit import Action, web_actor
from service.reports import RequeueError, retry_job
from service.users import UserError
from service.web.admin_actions import audit_search, not_yourself, resend
from service.web.auth import SignedIn
from service.web.context import TEMPLATES, Admin, Context, WebContext, audit_event, require_csrf

router = APIRouter(include_in_schema=False)
PAGE_SIZE = 100
ACTION_FAMILIES = sorted({a.value.split(".")[0] + "." for a in Action})
WINDOWS = {"7": 7, "30": 30, "90": 90, "365": 365, "all": None}  # the statistics page's periods, in days


# -- overview, retry, resend ------------------------------------------------------------------


def _overview(request: Request, ctx: WebContext, who: SignedIn, *, message: str = "", error: str = "", status: int = 200) -> Response:
    return TEMPLATES.TemplateResponse(
        request,
        "admin.html",
        {
            "who": who,
            "counts": aq.overview(ctx.db, ctx.clock.now()),
            "failed": aq.failed_work(ctx.db),
            "skipped": _skipped(ctx),
            "message": message,
            "error": error,
        },
        status_code=status,
    )


def _skipped(ctx: WebContext) -> list[routing.SkippedSeries]:
    with ctx.db.session() as s:
        return routing.recent_skips(s, limit=50)


@router.get("/admin", response_class=HTMLResponse)
def overview(request: Request, ctx: Context, who: Admin, message: str = "") -> Response:
    return _overview(request, ctx, who, message=message)


@router.post("/admin/jobs/{job_id}/retry")
async def retry(request: Request, ctx: Context, who: Admin, job_id: int) -> Response:
    await require_csrf(request, who)
    try:
        retry_job(ctx.db, ctx.clock, job_id, web_actor(who.account.username))
    except RequeueError as exc:
        return _overview(request, ctx, who, error=str(exc), status=409)
    return RedirectResponse(f"/admin?message={quote(f'Job {job_id} is queued again.')}", status_code=303)


@router.post("/admin/reports/{sr_uid}/resend")
async def resend_page(request: Request, ctx: Context, who: Admin, sr_uid: str) -> Response:
    await require_csrf(request, who)
    destination = str((await request.form()).get("destination") or "").strip() or None
    try:
        queued = resend(ctx, who, sr_uid, destination)
    except RequeueError as exc:
        return _overview(request, ctx, who, error=str(exc), status=409)
    message = f"SR {sr_uid} is queued for {', '.join(queued)}."
    return RedirectResponse(f"/admin?message={quote(message)}", status_code=303)


# -- the audit trail --------------------------------------------------------------------------


@router.get("/admin/audit", response_class=HTMLResponse)
def audit_page(request: Request, ctx: Context, who: Admin, page: int = 1) -> Response:
    params = dict(request.query_params)
    filters = {k: params.get(k, "") for k in ("study", "accession", "patient", "user", "action", "since", "until")}
    page = max(page, 1)
    try:
        search = audit_search(params, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    except aq.QueryError as exc:
        return TEMPLATES.TemplateResponse(
            request,
            "admin_audit.html",
            {
                "who": who,
                "filters": filters,
                "rows": [],
                "more": False,
                "page": page,
                "error": str(exc),
                "query": "",
                "actions": [a.value for a in Action],
                "families": ACTION_FAMILIES,
            },
            status_code=400,
        )
    result = aq.search_audit(ctx.db, search)
    audit_event(request, Action.AUDIT_SEARCHED, "audit", "events", filters=search.filters(), page=page, shown=len(result.rows))
    query = urlencode({k: v for k, v in filters.items() if v})
    return TEMPLATES.TemplateResponse(
        request,
        "admin_audit.html",
        {
            "who": who,
            "filters": filters,
            "rows": result.rows,
            "more": result.more,
            "page": page,
            "error": "",
            "query": query,
            "actions": [a.value for a in Action],
            "families": ACTION_FAMILIES,
        },
    )


@router.get("/admin/audit.csv")
def audit_csv(request: Request, ctx: Context, who: Admin) -> Response:
    try:
        search = audit_search(dict(request.query_params), limit=aq.MAX_ROWS, offset=0)
    except aq.QueryError as exc:
        return Response(str(exc), status_code=400, media_type="text/plain")
    export = aq.export_audit(ctx.db, search, spreadsheet_safe=True)
    audit_event(request, Action.AUDIT_EXPORTED, "audit", "events", filters=search.filters(), rows=export.rows, truncated=export.more)
    name = f"medcap-audit-{ctx.clock.now():%Y%m%dT%H%M%SZ}.csv"
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    if export.more:
        headers["X-MedCap-Truncated"] = f"only the newest {aq.MAX_ROWS} events; narrow the search"
    return StreamingResponse(iter(export.chunks), media_type="text/csv; charset=utf-8", headers=headers)


# -- statistics -------------------------------------------------------------------------------


@router.get("/admin/stats", response_class=HTMLResponse)
def stats(request: Request, ctx: Context, who: Admin, days: str = "30") -> Response:
    if days not in WINDOWS:
        days = "30"
    window = WINDOWS[days]
    since = ctx.clock.now() - timedelta(days=window) if window else None
    return TEMPLATES.TemplateResponse(
        request,
        "admin_stats.html",
        {
            "who": who,
            "days": days,
            "windows": list(WINDOWS),
            "turnaround": aq.turnaround_by_model(ctx.db, since=since),
            "quality": aq.model_quality(ctx.db, since=since),
            "duration": aq.duration,
        },
    )


# -- users ------------------------------------------------------------------------------------


def _users(
    request: Request,
    ctx: WebContext,
    who: SignedIn,
    *,
    message: str = "",
    error: str = "",
    status: int = 200,
    form: dict[str, str] | None = None,
) -> Response:
    return TEMPLATES.TemplateResponse(
        request,
        "admin_users.html",
        {
            "who": who,
            "users": ctx.users.list(),
            "message": message,
            "error": error,
            "form": form or {},
        },
        status_code=status,
    )


def _done(message: str) -> Response:
    return RedirectResponse(f"/admin/users?message={quote(message)}", status_code=303)


@router.get("/admin/users", response_class=HTMLResponse)
def users(request: Request, ctx: Context, who: Admin, message: str = "") -> Response:
    return _users(request, ctx, who, message=message)


@router.post("/admin/users")
async def add_user(request: Request, ctx: Context, who: Admin) -> Response:
    await require_csrf(request, who)
    form = {k: str(v) for k, v in (await request.form()).items()}
    try:
        account = ctx.users.add(
            form.get("username", "").strip(),
            form.get("display_name", "").strip(),
            form.get("role", ""),
            form.get("password", ""),
            web_actor(who.account.username),
        )
    except UserError as exc:
        kept = {k: form.get(k, "") for k in ("username", "display_name", "role")}  # never echo the password
        return _users(request, ctx, who, error=str(exc), status=400, form=kept)
    return _done(f"User {account.username} added as {account.role.value}.")


@router.post("/admin/users/{username}/disable")
async def disable_user(request: Request, ctx: Context, who: Admin, username: str) -> Response:
    return await _set_disabled(request, ctx, who, username, True)


@router.post("/admin/users/{username}/enable")
async def enable_user(request: Request, ctx: Context, who: Admin, username: str) -> Response:
    return await _set_disabled(request, ctx, who, username, False)


async def _set_disabled(request: Request, ctx: WebContext, who: SignedIn, username: str, disabled: bool) -> Response:
    await require_csrf(request, who)
    try:
        not_yourself(who, username, disabled)
        ctx.users.set_disabled(username, disabled, web_actor(who.account.username))
    except UserError as exc:
        return _users(request, ctx, who, error=str(exc), status=400)
    return _done(f"User {username} {'disabled: they can no longer sign in' if disabled else 'enabled'}.")


@router.post("/admin/users/{username}/password")
async def reset_password(request: Request, ctx: Context, who: Admin, username: str) -> Response:
    await require_csrf(request, who)
    password = str((await request.form()).get("password", ""))
    try:
        ctx.users.reset_password(username, password, web_actor(who.account.username))
    except UserError as exc:
        return _users(request, ctx, who, error=str(exc), status=400)
    return _done(f"Password of {username} changed.")
