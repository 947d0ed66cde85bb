"""The pages people use: sign-in, the worklist, and the review page (its stack viewer's images: ``stack.py``)."""

from __future__ import annotations

import dataclasses
import secrets
from datetime import date, datetime
from functools import lru_cache
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select

from dicom_io.render import render_png
from dicom_io.review_facts import StudyFacts, study_facts
from service.audit import Action
from service.report_diff import word_diff
from service.review import DraftView, ReviewConflict, ReviewError, ReviewState
from service.schema import Instance, SeriesRecord, SRDocument, Study
from service.storage import Storage, StoredFileMissing
from service.web.auth import COOKIE, LoginThrottled
from service.web.context import TEMPLATES, Anyone, Context, Radiologist, WebContext, audit_event, client_address, require_csrf
from service.web.stack import cached_series, header_facts
from service.worklist import WorklistFilter, earlier_reports, header_paths, list_drafts, neighbours, reading_order

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
    if not expected or not secrets.compare_digest(expected, login_csrf):
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


STATE_WORDS = ", ".join([*(s.value for s in ReviewState), "all"])
SORT_WORDS = {
    "waiting": "longest waiting",
    "priority": "priority, then longest waiting",
    "newest": "newest draft",
    "study_date": "study date",
    "patient": "patient name",
}
#: Request priorities, most urgent first (DICOM RequestedProcedurePriority and the usual RIS words).
PRIORITY_RANK = {"STAT": 0, "HIGH": 1, "URGENT": 1, "MEDIUM": 2, "ROUTINE": 3, "LOW": 4}
#: Region filter and priority order work on header facts (not database columns): over this many drafts at most.
FACT_WINDOW = 1000


def _bad_filter(request: Request, who: Radiologist, message: str) -> Response:
    return TEMPLATES.TemplateResponse(request, "error.html", {"who": who, "title": "Check the filter", "message": message}, status_code=400)


def _day(value: str, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name} {value!r} is not a date: write it as YYYY-MM-DD, e.g. 2026-01-31.") from None


def waited(since: datetime, now: datetime) -> str:
    """How long a draft has waited, as people say it: "45 min", "3 h 10 min", "2 d 4 h"."""
    minutes = max(0, int((now - since).total_seconds() // 60))
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 24 * 60:
        return f"{minutes // 60} h {minutes % 60} min"
    return f"{minutes // (24 * 60)} d {minutes % (24 * 60) // 60} h"


@lru_cache(maxsize=1024)
def _study_facts(storage: Storage, path: str) -> StudyFacts | None:
    # Stored files never change (their names carry the content hash): one header read per study.
    try:
        return study_facts(storage.read_dataset(path, stop_before_pixels=True))
    except (OSError, ValueError, StoredFileMissing):
        return None


def facts_of_studies(ctx: WebContext, study_uids: list[str]) -> dict[str, StudyFacts]:
    found = {}
    for uid, path in header_paths(ctx.db, study_uids).items():
        facts = _study_facts(ctx.settings.storage, path)
        if facts is not None:
            found[uid] = facts
    return found


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
    region: str = "",
    sort: str = "waiting",
    message: str = "",
    page: Annotated[int, Query(ge=1)] = 1,
) -> Response:
    state = state.strip()
    if state and state != "all" and state not in {s.value for s in ReviewState}:
        return _bad_filter(request, who, f"There is no state {state!r}. Choose one of: {STATE_WORDS}.")
    if sort not in SORT_WORDS:
        return _bad_filter(request, who, f"There is no order {sort!r}. Choose one of: {', '.join(SORT_WORDS)}.")
    try:
        where = WorklistFilter(
            state=ReviewState(state) if state and state != "all" else None,
            modality=modality.strip() or None,
            received_from=_day(received_from, "From"),
            received_to=_day(received_to, "To"),
            search=q.strip() or None,
            limit=50,
            offset=(page - 1) * 50,
            sort="waiting" if sort == "priority" else sort,
        )
    except ValueError as exc:
        message_text = str(exc)
        if "received_from is after received_to" in message_text:
            message_text = "The From date is after the To date."
        elif "modality" in message_text:
            message_text = f"{modality!r} is not a modality: use a DICOM code such as CT or MR."
        elif "search" in message_text:
            message_text = "Search for at most 64 characters."
        return _bad_filter(request, who, message_text)
    region = region.strip().upper()
    truncated = False
    if region or sort == "priority":
        rows, counts = list_drafts(ctx.db, dataclasses.replace(where, limit=FACT_WINDOW, offset=0))
        truncated = len(rows) == FACT_WINDOW
        facts = facts_of_studies(ctx, [r.study_uid for r in rows])
        if region:
            rows = [r for r in rows if r.study_uid in facts and (facts[r.study_uid].body_region or "").upper() == region]
        if sort == "priority":
            rows.sort(key=lambda r: PRIORITY_RANK.get((facts[r.study_uid].priority or "").upper(), 5) if r.study_uid in facts else 5)
        rows = rows[(page - 1) * 50 : page * 50]
    else:
        rows, counts = list_drafts(ctx.db, where)
    audit_event(
        request,
        Action.WORKLIST_VIEWED,
        "worklist",
        where.state.value if where.state else "all",
        filters={"modality": modality, "from": received_from, "to": received_to, "q": q, "region": region, "page": page, "sort": sort},
        shown=len(rows),
    )
    now = ctx.clock.now()
    return TEMPLATES.TemplateResponse(
        request,
        "worklist.html",
        {
            "who": who,
            "rows": rows,
            "counts": counts,
            "states": [s.value for s in ReviewState],
            "sorts": SORT_WORDS,
            "page": page,
            "message": message,
            "truncated": truncated,
            "fact_window": FACT_WINDOW,
            "facts": facts_of_studies(ctx, [r.study_uid for r in rows]),
            "waiting": {r.draft_id: waited(r.created_at, now) for r in rows},
            "filters": {
                "state": "" if state == "all" else state,
                "modality": modality,
                "received_from": received_from,
                "received_to": received_to,
                "q": q,
                "region": region,
                "sort": sort,
            },
        },
    )


@router.get("/worklist/next")
def first_draft(ctx: Context, who: Radiologist) -> Response:
    """Start reading: the draft that has waited longest."""
    order = reading_order(ctx.db, limit=1)
    if not order:
        return RedirectResponse(f"/worklist?message={quote('No drafts await review.')}", status_code=303)
    return RedirectResponse(f"/drafts/{order[0]}", status_code=303)


def _viewer_link(template: str, view: DraftView) -> str | None:
    if not template:
        return None
    values = {"study_uid": view.study_uid, "accession_number": view.accession_number or "", "patient_id": view.patient_id or ""}
    return template.format(**{k: quote(v, safe="") for k, v in values.items()})


def study_title(view: DraftView, facts: StudyFacts | None, description: str | None) -> str:
    """What the study is, in the page title: modality and description (or region), accession and date."""
    modalities = "/".join(dict.fromkeys(str(s["modality"]) for s in view.series if s.get("modality")))
    what = description or (facts.body_region.title() if facts and facts.body_region else "study")
    said = what.split(" ", 1)[0].upper() in modalities.split("/")  # "CT HEAD ..." already names its modality
    parts = [what if said else f"{modalities} {what}".strip()]
    if view.accession_number:
        parts.append(view.accession_number)
    return " · ".join(parts)


def _review_context(ctx: WebContext, who: Radiologist, view: DraftView) -> dict[str, object]:
    with ctx.db.session() as s:
        study = s.scalar(select(Study).where(Study.study_uid == view.study_uid))
        description, study_date = (study.study_description, study.study_date) if study else (None, None)
    facts = facts_of_studies(ctx, [view.study_uid]).get(view.study_uid)
    previous, following = neighbours(ctx.db, view.id)
    finals: dict[str, str] = {}
    if view.review and view.review.get("findings"):
        finals = {str(f["series_uid"]): str(f["final"]) for f in view.review["findings"]}  # type: ignore[attr-defined]
    diffs = {}
    if view.state is ReviewState.APPROVED:
        for series in view.series:
            uid = str(series["series_uid"])
            diffs[uid] = word_diff(str(series["text"]), finals.get(uid, str(series["text"])))
        diffs["impression"] = word_diff(
            view.impression, str(view.review.get("impression") or view.impression) if view.review else view.impression
        )
    return {
        "who": who,
        "view": view,
        "title": study_title(view, facts, description),
        "study": {"description": description, "date": study_date},
        "facts": facts,
        "series_facts": {str(s["series_uid"]): header_facts(ctx, view.id, str(s["series_uid"])) for s in view.series},
        "finals": finals,
        "diffs": diffs,
        "earlier": earlier_reports(ctx.db, view.patient_id, view.study_uid),
        "previous_id": previous,
        "next_id": following,
        "viewer_link": _viewer_link(ctx.settings.viewer_url_template, view),
        "waited": waited(view.created_at, ctx.clock.now()),
        "awaiting": view.state is ReviewState.AWAITING,
    }


@router.get("/drafts/{draft_id}", response_class=HTMLResponse)
def review_page(request: Request, ctx: Context, who: Radiologist, draft_id: int, message: str = "") -> Response:
    view = ctx.reviews.view(draft_id)
    if view is None:
        return TEMPLATES.TemplateResponse(
            request, "error.html", {"who": who, "title": "Not found", "message": f"There is no draft {draft_id}."}, status_code=404
        )
    audit_event(request, Action.STUDY_VIEWED, "sr_document", view.sop_instance_uid, study_uid=view.study_uid, draft_id=draft_id)
    return TEMPLATES.TemplateResponse(request, "review.html", {**_review_context(ctx, who, view), "message": message})


def _move_on(ctx: WebContext, draft_id: int, message: str) -> Response:
    """After a decision: the next draft awaiting review, or this one (decided) when none is left."""
    _, following = neighbours(ctx.db, draft_id)
    if following is None:
        return RedirectResponse(f"/drafts/{draft_id}?message={quote(message + ' No more drafts await review.')}", status_code=303)
    return RedirectResponse(f"/drafts/{following}?message={quote(message)}", status_code=303)


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
    return _move_on(ctx, draft_id, f"Approved draft {draft_id}. Verified report {uid} is on its way to the PACS.")


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
    return _move_on(ctx, draft_id, f"Rejected draft {draft_id}.")


def _review_error(request: Request, ctx: Context, who: Radiologist, draft_id: int, message: str, status: int) -> Response:
    view = ctx.reviews.view(draft_id)
    if view is None:
        return TEMPLATES.TemplateResponse(request, "error.html", {"who": who, "title": "Not found", "message": message}, status_code=404)
    return TEMPLATES.TemplateResponse(
        request, "review.html", {**_review_context(ctx, who, view), "message": "", "error": message}, status_code=status
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
        png = render_png(cached_series(ctx.settings.storage, paths, series_uid), sop_instance_uid, frame=frame, window=window)
    except (KeyError, ValueError) as exc:
        return Response(str(exc), status_code=404 if isinstance(exc, KeyError) else 400, media_type="text/plain")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})
