"""The review web app: server-rendered pages for people, a JSON API (with its OpenAPI schema) for programs.

``create_app`` wires the domain objects (users, sessions, reviews) to FastAPI; the routes live in
``pages.py`` (HTML), ``api.py`` (JSON), ``admin.py`` and ``admin_api.py``. Access rules are
dependencies in ``context.py``: signed in, then a role; state-changing requests also need the
session's CSRF token. Every refusal is an audit event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from service import outputs
from service.audit import Action
from service.clock import Clock, SystemClock
from service.database import Database
from service.review import Reviews
from service.settings import Settings
from service.stow_requests import StowRequests
from service.users import Users
from service.web import admin, admin_api, api, dicomweb, pages, stack
from service.web.auth import Sessions
from service.web.context import TEMPLATES, Forbidden, NotSignedIn, WebContext, audit_event

HERE = Path(__file__).resolve().parent


def wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def create_app(settings: Settings, db: Database, clock: Clock | None = None) -> FastAPI:
    clock = clock or SystemClock()
    users = Users(db, clock)
    stow = StowRequests(settings, db, clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stow.close_stale()  # STOW-RS requests this process had open when it last stopped
        yield

    app = FastAPI(
        title="MedCap",
        summary="AI report drafts for CT and MR: review, approval and audit.",
        version="1",
        # No Swagger UI: it loads scripts from a CDN, which hospital networks (and our CSP) refuse.
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
        lifespan=lifespan,
    )
    app.state.ctx = WebContext(
        settings,
        db,
        clock,
        users,
        Sessions(db, clock, users, hours=settings.session_hours, max_failures=settings.login_max_failures),
        Reviews(
            db,
            clock,
            storage=settings.storage,
            destinations=list(settings.dispatch_destinations),
            organization=settings.verifier_organization,
            outputs=outputs.configured(settings),
        ),
    )
    app.state.stow = stow
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(pages.router)
    app.include_router(stack.router)
    app.include_router(admin.router)
    app.include_router(api.router, prefix="/api")
    app.include_router(admin_api.router, prefix="/api/admin")
    app.include_router(dicomweb.router)

    @app.exception_handler(NotSignedIn)
    async def _not_signed_in(request: Request, exc: NotSignedIn) -> Response:
        if wants_json(request):
            return JSONResponse({"detail": "sign in first"}, status_code=401)
        return RedirectResponse(f"/login?next={request.url.path}", status_code=303)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        audit_event(request, Action.ACCESS_DENIED, "route", f"{request.method} {request.url.path}", reason=exc.why)
        if wants_json(request):
            return JSONResponse({"detail": exc.why}, status_code=403)
        return TEMPLATES.TemplateResponse(request, "error.html", {"title": "Not allowed", "message": exc.why}, status_code=403)

    @app.middleware("http")
    async def _security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")  # patient data stays out of shared caches
        return response

    return app
