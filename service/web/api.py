"""The JSON API (``/api``; schema at ``/api/openapi.json``). Same sessions and rules as the pages:
sign in through ``/login``, then send the session cookie, and ``X-CSRF-Token`` on every POST."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field

from service.audit import Action
from service.review import ReviewConflict, ReviewError, ReviewState
from service.web.context import Anyone, Context, Radiologist, audit_event, client_address, require_csrf
from service.worklist import WorklistFilter, WorklistRow, list_drafts

router = APIRouter(tags=["review"])


class Me(BaseModel):
    username: str
    display_name: str
    role: str
    csrf_token: str = Field(description="Send as X-CSRF-Token on every POST")


class Worklist(BaseModel):
    counts: dict[str, int]
    drafts: list[WorklistRow]


class DraftDetail(BaseModel):
    draft_id: int
    sop_instance_uid: str
    study_uid: str
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None
    study_version: int
    created_at: datetime
    state: str
    status_banner: str
    model: dict[str, str]
    series: list[dict[str, Any]]
    impression: str
    review: dict[str, Any] | None


class Approval(BaseModel):
    findings: dict[str, str] = Field(default_factory=dict, description="series UID → final text; series left out keep the draft's text")
    impression: str | None = Field(None, description="final impression; default: the draft's")


class Rejection(BaseModel):
    reason: str = Field(min_length=1)


class Approved(BaseModel):
    verified_sr: str


@router.get("/me", response_model=Me)
def me(who: Anyone) -> Me:
    return Me(username=who.account.username, display_name=who.account.display_name, role=who.account.role.value, csrf_token=who.csrf_token)


@router.get("/drafts", response_model=Worklist)
def drafts(
    request: Request,
    ctx: Context,
    who: Radiologist,
    state: ReviewState | None = ReviewState.AWAITING,
    modality: str | None = None,
    received_from: date | None = None,
    received_to: date | None = None,
    q: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Worklist:
    try:
        where = WorklistFilter(state, modality, received_from, received_to, q, limit, offset)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    rows, counts = list_drafts(ctx.db, where)
    audit_event(request, Action.WORKLIST_VIEWED, "worklist", state.value if state else "all", shown=len(rows), api=True)
    return Worklist(counts=counts, drafts=rows)


@router.get("/drafts/{draft_id}", response_model=DraftDetail)
def draft(request: Request, ctx: Context, who: Radiologist, draft_id: int) -> DraftDetail:
    view = ctx.reviews.view(draft_id)
    if view is None:
        raise HTTPException(404, f"there is no draft {draft_id}")
    audit_event(request, Action.STUDY_VIEWED, "sr_document", view.sop_instance_uid, study_uid=view.study_uid, draft_id=draft_id, api=True)
    return DraftDetail(
        draft_id=view.id,
        sop_instance_uid=view.sop_instance_uid,
        study_uid=view.study_uid,
        accession_number=view.accession_number,
        patient_id=view.patient_id,
        patient_name=view.patient_name,
        study_version=view.study_version,
        created_at=view.created_at,
        state=view.state.value,
        status_banner="AI draft - preliminary, not verified",
        model={
            "name": view.model_name,
            "version": view.model_version,
            "weights_sha256": view.weights_sha256,
            "generation_preset": view.generation_preset,
        },
        series=view.series,
        impression=view.impression,
        review=view.review,
    )


@router.post("/drafts/{draft_id}/approve", response_model=Approved)
async def approve(request: Request, ctx: Context, who: Radiologist, draft_id: int, body: Approval) -> Approved:
    await require_csrf(request, who)
    try:
        uid = ctx.reviews.approve(
            draft_id, who.account, findings=body.findings, impression=body.impression, address=client_address(request)
        )
    except ReviewConflict as exc:
        raise HTTPException(409, str(exc)) from None
    except ReviewError as exc:
        raise HTTPException(400, str(exc)) from None
    return Approved(verified_sr=uid)


@router.post("/drafts/{draft_id}/reject", status_code=204)
async def reject(request: Request, ctx: Context, who: Radiologist, draft_id: int, body: Rejection) -> None:
    await require_csrf(request, who)
    try:
        ctx.reviews.reject(draft_id, who.account, body.reason, address=client_address(request))
    except ReviewConflict as exc:
        raise HTTPException(409, str(exc)) from None
    except ReviewError as exc:
        raise HTTPException(400, str(exc)) from None
