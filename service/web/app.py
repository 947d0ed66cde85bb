"""The review web app: server-rendered pages for people, a JSON API (with its OpenAPI schema) for programs.

``create_app`` wires the domain objects (users, sessions, reviews) to FastAPI; the routes live in
``pages.py`` (HTML), ``api.py`` (JSON), ``admin.py`` and ``admin_api.py``. Access rules are
dependencies in ``context.py``: signed in, then a role; state-changing requests also need the
session's CSRF token. Every refusal is an audit event.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


SECURITY_HEADERS = (
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
log = logging.getLogger(__name__)


class SecurityHeaders:
    """Security headers on every response: pages, API answers, static files, 404s, and 500s.

    A plain ASGI middleware that adds them to whatever response starts, and answers an exception
    that escaped the app itself with a 500 that has them: Starlette's own 500 is written by its
    outermost middleware, past any middleware the app adds.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cacheable = str(scope.get("path", "")).startswith("/static/")
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS:
                    headers.setdefault(name.decode(), value.decode())
                if not cacheable:
                    headers.setdefault("cache-control", "no-store")  # patient data stays out of shared caches
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            if started:
                raise
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            error = PlainTextResponse("Internal server error", status_code=500)
            await error(scope, receive, send_with_headers)


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

    app.add_middleware(SecurityHeaders)
    return app
