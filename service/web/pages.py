"""The pages people use: sign-in, the worklist, and the review page with its key images."""

from __future__ import annotations

import secrets
from datetime import date
from functools import lru_cache
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select

from dicom_io.render import VIEW_WINDOWS, render_png
from dicom_io.series import Series
from service.audit import Action
from service.review import ReviewConflict, ReviewError, ReviewState
from service.schema import Instance, SeriesRecord, SRDocument
from service.storage import Storage
from service.web import notices
from service.web.auth import COOKIE, LoginThrottled, csrf_matches
from service.web.context import TEMPLATES, Anyone, Context, Radiologist, audit_event, client_address, require_csrf
from service.worklist import WorklistFilter, list_drafts

router = APIRouter(include_in_schema=False)
LOGIN_CSRF_COOKIE = "medcap_login_csrf"


def _safe_next(target: str | None) -> str:
    # Only same-site paths: an attacker's link must not turn sign-in into a redirect to elsewhere.
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target or any(ord(c) < 32 for c in target):
        return "/"
    return target


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None) -> Response:
    token = secrets.token_urlsafe(24)
    response = TEMPLATES.TemplateResponse(request, "login.html", {"next": _safe_next(next), "login_csrf": token, "error": None})
    response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, secure=True, samesite="strict", max_age=3600)
    return response


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    ctx: Context,
    username: Annotated[str, Form()],
    password: Annotated[str, Form()],
    login_csrf: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    def again(error: str, status: int) -> Response:
        token = secrets.token_urlsafe(24)
        page = TEMPLATES.TemplateResponse(
            request, "login.html", {"next": _safe_next(next), "login_csrf": token, "error": error}, status_code=status
        )
        page.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, secure=True, samesite="strict", max_age=3600)
        return page

    expected = request.cookies.get(LOGIN_CSRF_COOKIE)
    if not expected or not csrf_matches(expected, login_csrf):  # bytes: a non-ASCII token is a mismatch, not a 500
        return again("Your sign-in form expired. Please try again.", 400)
    try:
        signed = ctx.sessions.sign_in(username.strip(), password, client_address(request))
    except LoginThrottled:
        return again("Too many failed sign-ins. Wait 15 minutes or ask an administrator.", 429)
    if signed is None:
        return again("Wrong user name or password, or the account is disabled.", 401)
    target = _safe_next(next)
    if target == "/":
        target = "/admin" if signed.account.is_admin else "/worklist"
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, signed.token, httponly=True, secure=True, samesite="strict", max_age=int(ctx.settings.session_hours * 3600))
    response.delete_cookie(LOGIN_CSRF_COOKIE)
    return response


@router.post("/logout")
async def logout(request: Request, ctx: Context, who: Anyone) -> Response:
    await require_csrf(request, who)
    ctx.sessions.sign_out(who, client_address(request))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response


@router.get("/")
def home(who: Anyone) -> Response:
    return RedirectResponse("/admin" if who.account.is_admin else "/worklist", status_code=303)


@router.get("/worklist", response_class=HTMLResponse)
def worklist(
    request: Request,
    ctx: Context,
    who: Radiologist,
    state: str = ReviewState.AWAITING.value,
    modality: str = "",
    received_from: str = "",
    received_to: str = "",
    q: str = "",
    page: Annotated[int, Query(ge=1)] = 1,
) -> Response:
    try:
        where = WorklistFilter(
            state=ReviewState(state) if state else None,
            modality=modality.strip() or None,
            received_from=date.fromisoformat(received_from) if received_from else None,
            received_to=date.fromisoformat(received_to) if received_to else None,
            search=q.strip() or None,
            limit=50,
            offset=(page - 1) * 50,
        )
    except ValueError as exc:
        return TEMPLATES.TemplateResponse(request, "error.html", {"who": who, "title": "Bad filter", "message": str(exc)}, status_code=400)
    rows, counts = list_drafts(ctx.db, where)
    audit_event(
        request,
        Action.WORKLIST_VIEWED,
        "worklist",
        state or "all",
        filters={"modality": modality, "from": received_from, "to": received_to, "q": q, "page": page},
        shown=len(rows),
    )
    return TEMPLATES.TemplateResponse(
        request,
        "worklist.html",
        {
            "who": who,
            "rows": rows,
            "counts": counts,
            "states": [s.value for s in ReviewState],
            "page": page,
            "filters": {"state": state, "modality": modality, "received_from": received_from, "received_to": received_to, "q": q},
        },
    )


@router.get("/drafts/{draft_id}", response_class=HTMLResponse)
def review_page(request: Request, ctx: Context, who: Radiologist, draft_id: int, window: str = "default") -> Response:
    view = ctx.reviews.view(draft_id)
    if view is None:
        return TEMPLATES.TemplateResponse(
            request, "error.html", {"who": who, "title": "Not found", "message": f"There is no draft {draft_id}."}, status_code=404
        )
    audit_event(request, Action.STUDY_VIEWED, "sr_document", view.sop_instance_uid, study_uid=view.study_uid, draft_id=draft_id)
    return TEMPLATES.TemplateResponse(
        request,
        "review.html",
        {
            "who": who,
            "view": view,
            "window": window if window in VIEW_WINDOWS else "default",
            "windows": VIEW_WINDOWS,
            "message": notices.text(request.query_params),
            "awaiting": view.state is ReviewState.AWAITING,
        },
    )


@router.post("/drafts/{draft_id}/approve")
async def approve(request: Request, ctx: Context, who: Radiologist, draft_id: int) -> Response:
    await require_csrf(request, who)
    form = await request.form()
    findings = {key.removeprefix("finding:"): str(value) for key, value in form.items() if key.startswith("finding:")}
    try:
        uid = ctx.reviews.approve(
            draft_id, who.account, findings=findings, impression=str(form.get("impression", "")), address=client_address(request)
        )
    except ReviewConflict as exc:
        return _review_error(request, ctx, who, draft_id, str(exc), 409)
    except ReviewError as exc:
        return _review_error(request, ctx, who, draft_id, str(exc), 400)
    return RedirectResponse(notices.link(f"/drafts/{draft_id}", "approved", sr=uid), status_code=303)


@router.post("/drafts/{draft_id}/reject")
async def reject(request: Request, ctx: Context, who: Radiologist, draft_id: int) -> Response:
    await require_csrf(request, who)
    form = await request.form()
    try:
        ctx.reviews.reject(draft_id, who.account, str(form.get("reason", "")), address=client_address(request))
    except ReviewConflict as exc:
        return _review_error(request, ctx, who, draft_id, str(exc), 409)
    except ReviewError as exc:
        return _review_error(request, ctx, who, draft_id, str(exc), 400)
    return RedirectResponse(notices.link(f"/drafts/{draft_id}", "rejected"), status_code=303)


def _review_error(request: Request, ctx: Context, who: Radiologist, draft_id: int, message: str, status: int) -> Response:
    view = ctx.reviews.view(draft_id)
    if view is None:
        return TEMPLATES.TemplateResponse(request, "error.html", {"who": who, "title": "Not found", "message": message}, status_code=404)
    return TEMPLATES.TemplateResponse(
        request,
        "review.html",
        {
            "who": who,
            "view": view,
            "window": "default",
            "windows": VIEW_WINDOWS,
            "message": "",
            "error": message,
            "awaiting": view.state is ReviewState.AWAITING,
        },
        status_code=status,
    )


@router.get("/drafts/{draft_id}/images/{sop_instance_uid}.png")
def key_image(
    request: Request,
    ctx: Context,
    who: Radiologist,
    draft_id: int,
    sop_instance_uid: str,
    frame: int | None = None,
    window: str = "default",
) -> Response:
    """A key image of the draft's study, rendered from the stored DICOM (only images of that study)."""
    with ctx.db.session() as s:
        study_id = s.scalar(select(SRDocument.study_id).where(SRDocument.id == draft_id))
        row = s.execute(select(Instance.series_id, Instance.study_id).where(Instance.sop_instance_uid == sop_instance_uid)).first()
        if study_id is None or row is None or row.study_id != study_id:
            return Response("no such image in this study", status_code=404, media_type="text/plain")
        paths = tuple(
            s.scalars(select(Instance.path).where(Instance.series_id == row.series_id, Instance.captionable).order_by(Instance.path))
        )
        series_uid = s.scalar(select(SeriesRecord.series_uid).where(SeriesRecord.id == row.series_id))
    try:
        png = render_png(_series(ctx.settings.storage, paths, series_uid), sop_instance_uid, frame=frame, window=window)
    except (KeyError, ValueError) as exc:
        return Response(str(exc), status_code=404 if isinstance(exc, KeyError) else 400, media_type="text/plain")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


@lru_cache(maxsize=8)
def _series(storage: Storage, paths: tuple[str, ...], series_uid: str | None) -> Series:
    # Headers of a series are read once for all its key images; pixel data is read per slice.
    for series in storage.read_series(paths):
        if series.series_uid == series_uid:
            return series
    raise KeyError(f"series {series_uid} cannot be loaded")
