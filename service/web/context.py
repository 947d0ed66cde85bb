"""What the web routes share: the app's domain objects (``WebContext``), the access rules as
FastAPI dependencies (signed in, then a role; state-changing requests also need the session's CSRF
token), the templates, and the audit of what a signed-in user did. The routers (pages.py, api.py,
admin.py, admin_api.py) and app.py import this module; it imports none of them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates

from service import audit
from service.audit import Action
from service.clock import Clock
from service.database import Database
from service.review import Reviews
from service.schema import Role
from service.settings import Settings
from service.users import Users
from service.web.auth import COOKIE, Sessions, SignedIn, csrf_matches

TEMPLATES = Jinja2Templates(directory=Path(__file__).resolve().parent / "templates")


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
    return request.app.state.ctx


def client_address(request: Request) -> str:
    """Who is calling: the TCP peer, or, when that peer is a configured reverse proxy, the address
    its X-Forwarded-For names. The header is read right to left, past our own proxies: the first
    address that is not one of them is the client (anything left of it is what the client wrote)."""
    peer = request.client.host if request.client else "unknown"
    proxies = context(request).settings.web_trusted_proxies
    if not proxies or not _within(peer, proxies):
        return peer
    forwarded = [part.strip() for value in request.headers.getlist("x-forwarded-for") for part in value.split(",")]
    for hop in reversed(forwarded):
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            return peer  # a malformed hop: trust none of it
        if not _within(str(address), proxies):
            return str(address)
        peer = str(address)
    return peer


def _within(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


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
