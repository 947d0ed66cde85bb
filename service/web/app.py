"""The review web app: server-rendered pages for people, a JSON API (with its OpenAPI schema) for programs.

``create_app`` wires the domain objects (users, sessions, reviews) to FastAPI; the routes live in
``pages.py`` (HTML), ``api.py`` (JSON) and ``admin.py``. Access rules are dependencies in this
module: signed in, then a role; state-changing requests also need the session's CSRF token.
Every refusal is an audit event.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from service import audit, outputs
from service.audit import Action
from service.clock import Clock, SystemClock
from service.database import Database
from service.review import Reviews
from service.schema import Role
from service.settings import Settings
from service.users import Users
from service.web.auth import COOKIE, Sessions, SignedIn, csrf_matches

HERE = Path(__file__).resolve().parent
TEMPLATES = Jinja2Templates(directory=HERE / "templates")


@dataclass
class WebContext:
    settings: Settings
    db: Database
    clock: Clock
    users: Users
    sessions: Sessions
    reviews: Reviews


class NotSignedIn(Exception):
    pass


class Forbidden(Exception):
    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def context(request: Request) -> WebContext:
    return request.app.state.ctx  # type: ignore[no-any-return]


def client_address(request: Request) -> str:
    # The direct peer; behind a reverse proxy this is the proxy (X-Forwarded-For is not trusted by default).
    return request.client.host if request.client else "unknown"


def signed_in(request: Request) -> SignedIn:
    found = context(request).sessions.lookup(request.cookies.get(COOKIE))
    if found is None:
        raise NotSignedIn
    request.state.signed_in = found
    return found


def _role(role: Role) -> Any:
    def check(request: Request, who: Annotated[SignedIn, Depends(signed_in)]) -> SignedIn:
        if who.account.role is not role:
            raise Forbidden(f"this needs the {role.value} role")
        return who

    return check


radiologist = _role(Role.RADIOLOGIST)
admin = _role(Role.ADMIN)
Radiologist = Annotated[SignedIn, Depends(radiologist)]
Admin = Annotated[SignedIn, Depends(admin)]
Anyone = Annotated[SignedIn, Depends(signed_in)]
Context = Annotated[WebContext, Depends(context)]


async def require_csrf(request: Request, who: SignedIn) -> None:
    """State-changing requests echo the session's CSRF token, as a form field or a header."""
    given = request.headers.get("X-CSRF-Token")
    if given is None and request.headers.get("content-type", "").startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        given = (await request.form()).get("csrf_token")  # type: ignore[assignment]
    if not csrf_matches(who.csrf_token, given):
        raise Forbidden("missing or wrong CSRF token")


def audit_event(
    request: Request, action: Action, object_type: str, object_id: str | int, *, study_uid: str | None = None, **details: Any
) -> None:
    """Record what a signed-in user did or saw, with where from."""
    ctx = context(request)
    who: SignedIn | None = getattr(request.state, "signed_in", None)
    actor = audit.web_actor(who.account.username) if who else f"web:{client_address(request)}"
    with ctx.db.session() as s:
        audit.record(
            s, ctx.clock.now(), actor, action, object_type, object_id, study_uid=study_uid, address=client_address(request), **details
        )


def wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def create_app(settings: Settings, db: Database, clock: Clock | None = None) -> FastAPI:
    from service.web import admin as admin_routes
    from service.web import admin_api, api, pages

    clock = clock or SystemClock()
    users = Users(db, clock)
    app = FastAPI(
        title="MedCap",
        summary="AI report drafts for CT and MR: review, approval and audit.",
        version="1",
        # No Swagger UI: it loads scripts from a CDN, which hospital networks (and our CSP) refuse.
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
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
            reports_dir=settings.reports_dir,
            destinations=[str(d) for d in settings.destination_list],
            organization=settings.verifier_organization,
            outputs=outputs.configured(settings),
        ),
    )
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(pages.router)
    app.include_router(admin_routes.router)
    app.include_router(api.router, prefix="/api")
    app.include_router(admin_api.router, prefix="/api/admin")

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
