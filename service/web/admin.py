"""The admins' pages: failed work with retry and resend, users."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from service.reports import list_reports
from service.web.app import TEMPLATES, Admin, Context

router = APIRouter(include_in_schema=False)


@router.get("/admin", response_class=HTMLResponse)
def overview(request: Request, ctx: Context, who: Admin) -> Response:
    failed = list_reports(ctx.db, failed_only=True, limit=200)
    users = ctx.users.list()
    return TEMPLATES.TemplateResponse(request, "admin.html", {"who": who, "failed": failed, "users": users})
