"""Who may do what: every route of the app × anonymous, radiologist and admin, on the real app and database.

The routes are enumerated from ``app.routes``, so a route added without a rule here fails
``test_every_route_has_a_rule``. Each rule gives the expected outcome per caller:

- ``LOGIN``: not signed in — pages answer 303 to ``/login?next=<path>``, the JSON API 401;
- ``DENIED``: signed in with the wrong role — 403, recorded as ``auth.access_denied``;
- a status code: what the right caller gets, with a request that is valid for the route.

State-changing routes (``csrf=True``) must also refuse a signed-in caller of the right role who
sends no CSRF token, or a wrong one (403, nothing changes). Admin routes (``/admin...`` and
``/api/admin...``) are being written alongside this test: any route under those prefixes is
admin-only, whatever it is, and is checked with generated parameters.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import BaseModel
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from starlette.routing import Mount

from service.schema import AuditEvent, Draft, Review, SRDocument
from tests.service.web.conftest import PASSWORD, sign_in

try:  # FastAPI ≥ 0.160 keeps included routers lazily in app.routes
    from fastapi.routing import iter_route_contexts
except ImportError:  # pragma: no cover - older FastAPI: app.routes is flat already
    iter_route_contexts = None

LOGIN = "login"  # anonymous: 303 to the sign-in page (pages) or 401 (API)
DENIED = "denied"  # wrong role: 403, audited
ADMIN_PREFIXES = ("/admin", "/api/admin")
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


# -- the routes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteInfo:
    method: str
    path: str
    route: Any  # the route object (APIRoute, Route or Mount)

    @property
    def key(self) -> tuple[str, str]:
        return self.method, self.path

    @property
    def is_admin(self) -> bool:
        return any(self.path == p or self.path.startswith(p + "/") for p in ADMIN_PREFIXES)


def app_routes(app: Any) -> list[RouteInfo]:
    """Every (method, path) the app serves, with routers included under their prefixes; HEAD is GET's twin."""
    contexts = iter_route_contexts(app.routes) if iter_route_contexts else app.routes
    found = []
    for context in contexts:
        route = getattr(context, "original_route", context)
        if isinstance(route, Mount):
            found.append(RouteInfo("GET", context.path, route))
            continue
        for method in sorted((context.methods or set()) - {"HEAD"}):
            found.append(RouteInfo(method, context.path, context if isinstance(route, APIRoute) else route))
    return found


def is_api(path: str) -> bool:
    return path.startswith("/api/")


# -- what a request needs ------------------------------------------------------------------


@dataclass
class World:
    """What the requests are made of: the app, a draft (and fresh copies of it), signed-in clients."""

    app: Any
    db: Any
    draft_id: int
    key_image: str
    series_uid: str
    clients: dict[str, TestClient] = field(default_factory=dict)
    csrf: dict[str, str] = field(default_factory=dict)

    def fresh_draft(self) -> int:
        return clone_draft(self.db, self.draft_id)


@dataclass(frozen=True)
class Call:
    path: str  # with the parameters filled in
    data: dict[str, str] | None = None  # a form
    json: dict[str, Any] | None = None
    params: dict[str, str] | None = None
    csrf_in: str = "form"  # where the CSRF token goes: "form" field or "header"


@dataclass(frozen=True)
class Rule:
    anonymous: int | str
    radiologist: int | str
    admin: int | str
    csrf: bool = False  # state-changing: refused (403) without the session's CSRF token
    call: Callable[[World], Call] | None = None  # a valid request for this route; default: the path as is
    location: str | None = None  # where a 303 for the right caller must lead (prefix)


def _path(template: str) -> Callable[[World], Call]:
    def fill(w: World, fresh: bool = False) -> Call:
        draft = w.fresh_draft() if fresh else w.draft_id
        return Call(template.format(draft_id=draft, sop_instance_uid=w.key_image))

    return fill


RULES: dict[tuple[str, str], Rule] = {
    # public
    ("GET", "/login"): Rule(200, 200, 200),
    ("GET", "/static"): Rule(200, 200, 200, call=lambda w: Call("/static/medcap.css")),
    ("GET", "/api/openapi.json"): Rule(200, 200, 200),
    # POST /login has its own CSRF (a double-submit cookie): tested in test_login_needs_its_form_token below
    ("POST", "/login"): Rule(303, 303, 303),
    # anyone signed in
    ("GET", "/"): Rule(LOGIN, 303, 303),
    ("POST", "/logout"): Rule(LOGIN, 303, 303, csrf=True, location="/login"),
    ("GET", "/api/me"): Rule(LOGIN, 200, 200),
    # radiologists
    ("GET", "/worklist"): Rule(LOGIN, 200, DENIED),
    ("GET", "/drafts/{draft_id}"): Rule(LOGIN, 200, DENIED, call=_path("/drafts/{draft_id}")),
    ("GET", "/drafts/{draft_id}/images/{sop_instance_uid}.png"): Rule(
        LOGIN, 200, DENIED, call=_path("/drafts/{draft_id}/images/{sop_instance_uid}.png")
    ),
    ("GET", "/worklist/next"): Rule(LOGIN, 303, DENIED, location="/drafts/"),
    ("GET", "/drafts/{draft_id}/series/{series_uid}/stack.json"): Rule(
        LOGIN, 200, DENIED, call=lambda w: Call(f"/drafts/{w.draft_id}/series/{w.series_uid}/stack.json")
    ),
    ("GET", "/drafts/{draft_id}/series/{series_uid}/slices/{index}.png"): Rule(
        LOGIN, 200, DENIED, call=lambda w: Call(f"/drafts/{w.draft_id}/series/{w.series_uid}/slices/0.png", params={"c": "40", "w": "80"})
    ),
    ("POST", "/drafts/{draft_id}/approve"): Rule(
        LOGIN,
        303,
        DENIED,
        csrf=True,
        location="/drafts/",
        call=lambda w: Call(f"/drafts/{w.fresh_draft()}/approve", data={f"finding:{w.series_uid}": "Edited.", "impression": "Normal."}),
    ),
    ("POST", "/drafts/{draft_id}/reject"): Rule(
        LOGIN,
        303,
        DENIED,
        csrf=True,
        location="/drafts/",
        call=lambda w: Call(f"/drafts/{w.fresh_draft()}/reject", data={"reason": "Wrong series."}),
    ),
    # DICOMweb in (STOW-RS): a client's bearer token, never a session: signed in or not, 401 (tests/service/web/test_dicomweb.py)
    ("POST", "/dicomweb/studies"): Rule(401, 401, 401),
    ("POST", "/dicomweb/studies/{study_uid}"): Rule(401, 401, 401, call=lambda w: Call("/dicomweb/studies/1.2.3")),
    ("GET", "/api/drafts"): Rule(LOGIN, 200, DENIED),
    ("GET", "/api/drafts/{draft_id}"): Rule(LOGIN, 200, DENIED, call=_path("/api/drafts/{draft_id}")),
    ("POST", "/api/drafts/{draft_id}/approve"): Rule(
        LOGIN,
        200,
        DENIED,
        csrf=True,
        call=lambda w: Call(f"/api/drafts/{w.fresh_draft()}/approve", json={"findings": {w.series_uid: "Edited."}}, csrf_in="header"),
    ),
    ("POST", "/api/drafts/{draft_id}/reject"): Rule(
        LOGIN,
        204,
        DENIED,
        csrf=True,
        call=lambda w: Call(f"/api/drafts/{w.fresh_draft()}/reject", json={"reason": "Wrong series."}, csrf_in="header"),
    ),
}


def rule_for(route: RouteInfo) -> Rule | None:
    if route.key in RULES:
        return RULES[route.key]
    if route.is_admin:  # written concurrently: admin-only, whatever it does
        return Rule(LOGIN, DENIED, "admin-ok", csrf=route.method in STATE_CHANGING, call=lambda w: generated_call(route))
    return None


# -- generated requests for admin routes ---------------------------------------------------


def _dependants(dependant: Any) -> Iterator[Any]:
    yield dependant
    for sub in dependant.dependencies:
        yield from _dependants(sub)


def _dummy(annotation: Any) -> Any:
    """A well-formed value of a type, pointing at nothing that exists (so admin actions find nothing to act on)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return typing.get_args(annotation)[0]
    if origin in (list, tuple, set):
        return []
    if origin is dict:
        return {}
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return {name: _dummy(f.annotation) for name, f in annotation.model_fields.items() if f.is_required()}
        if issubclass(annotation, bool):
            return False
        if issubclass(annotation, int | float):
            return 999999
        if hasattr(annotation, "__members__"):  # an enum
            return next(iter(annotation.__members__.values())).value
    return "nobody"


def generated_call(route: RouteInfo) -> Call:
    dependant = getattr(route.route, "dependant", None)
    if dependant is None:
        return Call(route.path)
    path, params, form, body = route.path, {}, {}, None
    for dep in _dependants(dependant):
        for p in dep.path_params:
            path = path.replace("{" + p.name + "}", str(_dummy(p.field_info.annotation)))
        for p in dep.query_params:
            if p.field_info.is_required():
                params[p.alias] = str(_dummy(p.field_info.annotation))
        for p in dep.body_params:
            if type(p.field_info).__name__ in ("Form", "File"):
                form[p.alias] = str(_dummy(p.field_info.annotation))
            elif body is None:
                body = _dummy(p.field_info.annotation)
    if body is not None:
        return Call(path, json=body, params=params or None, csrf_in="header")
    return Call(path, data=form or None, params=params or None)


def has_path_params(route: RouteInfo) -> bool:
    return "{" in route.path


# -- making the calls ---------------------------------------------------------------------


def send(client: TestClient, method: str, call: Call, csrf: str | None) -> Any:
    headers, data = {}, dict(call.data or {})
    if csrf is not None and method in STATE_CHANGING:
        if call.csrf_in == "header" or call.json is not None:
            headers["X-CSRF-Token"] = csrf
        else:
            data["csrf_token"] = csrf
    kwargs: dict[str, Any] = {"headers": headers, "params": call.params}
    if call.json is not None:
        kwargs["json"] = call.json
    elif method in STATE_CHANGING:
        kwargs["data"] = data
    return client.request(method, call.path, **kwargs)


def login_call(client: TestClient, username: str) -> Any:
    """POST /login as the form does it (with the form's token)."""
    page = client.get("/login")
    token = re.search(r'name="login_csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    return client.post("/login", data={"username": username, "password": PASSWORD, "login_csrf": token, "next": "/"})


def check(route: RouteInfo, who: str, expected: int | str, response: Any, location: str | None) -> str | None:
    """None if the response is what the rule says; otherwise why not."""
    got = f"{who} {route.method} {route.path}: got {response.status_code} {response.headers.get('location', '')}".rstrip()
    status = response.status_code
    if expected == LOGIN:
        if is_api(route.path):
            return None if status == 401 else f"{got}, expected 401"
        return None if status == 303 and response.headers["location"].startswith("/login?next=") else f"{got}, expected 303 to /login"
    if expected == DENIED:
        return None if status == 403 else f"{got}, expected 403"
    if expected == "admin-ok":
        if status in (401, 403) or status >= 500:
            return f"{got}, expected the admin to be let in"
        required_query = bool(generated_call(route).params or {})
        if route.method == "GET" and not has_path_params(route) and not required_query and status >= 400:
            return f"{got}, expected 2xx/3xx"
        return None
    if status != expected:
        return f"{got}, expected {expected}: {response.text[:200]}"
    if location and not response.headers.get("location", "").startswith(location):
        return f"{got}, expected a redirect to {location}..."
    return None


# -- fixtures and helpers -----------------------------------------------------------------


def clone_draft(db: Any, draft_id: int) -> int:
    """Another undecided draft of the same study version (a copy of the rows; the SR file is shared)."""
    with db.session() as s:
        doc = s.get(SRDocument, draft_id)
        values = {a.key: getattr(doc, a.key) for a in SRDocument.__mapper__.column_attrs if a.key != "id"}
        uid = generate_uid()
        copy = SRDocument(**{**values, "sop_instance_uid": uid, "idempotency_key": f"test-copy:{uid}"})
        s.add(copy)
        s.flush()
        for draft in s.scalars(select(Draft).where(Draft.sr_document_id == draft_id)).all():
            row = {a.key: getattr(draft, a.key) for a in Draft.__mapper__.column_attrs if a.key not in ("id", "sr_document_id")}
            s.add(Draft(**row, sr_document_id=copy.id))
        return copy.id


@pytest.fixture
def world(app, db, accounts, draft_id) -> Iterator[World]:
    with db.session() as s:
        draft = s.scalars(select(Draft).where(Draft.sr_document_id == draft_id)).first()
        key_image, series_uid = draft.key_images[0]["sop_instance_uid"], draft.series_uid
    w = World(app, db, draft_id, key_image, series_uid)
    with (
        TestClient(app, base_url="https://testserver", follow_redirects=False) as anonymous,
        TestClient(app, base_url="https://testserver", follow_redirects=False) as radiologist,
        TestClient(app, base_url="https://testserver", follow_redirects=False) as admin,
    ):
        w.clients = {"anonymous": anonymous, "radiologist": radiologist, "admin": admin}
        w.csrf = {"radiologist": sign_in(radiologist, "smith"), "admin": sign_in(admin, "root")}
        yield w


@contextmanager
def own_session(app: Any, role: str) -> Iterator[tuple[TestClient, str]]:
    """A client with a session of its own (for calls that end or change it), and its CSRF token."""
    with TestClient(app, base_url="https://testserver", follow_redirects=False) as client:
        yield client, sign_in(client, {"radiologist": "smith", "admin": "root"}[role])


def denials(db: Any) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).where(AuditEvent.action == "auth.access_denied")) or 0


def decisions(db: Any) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(Review)) or 0


# -- the tests ----------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_every_route_has_a_rule(app):
    routes = app_routes(app)
    assert {r.key for r in routes} >= set(RULES), "the rules name routes the app does not have"
    missing = [f"{r.method} {r.path}" for r in routes if rule_for(r) is None]
    assert missing == [], f"routes without an authorization rule in {__name__}: {missing}"
    assert all(r.key in RULES or r.is_admin for r in routes)


@pytest.mark.peers
def test_authorization_matrix(app, world, db):
    """Every route, every kind of caller: collect every mismatch, then fail once listing them all."""
    problems: list[str] = []
    routes = app_routes(app)
    assert len(routes) >= len(RULES)
    for route in routes:
        rule = rule_for(route)
        assert rule is not None, f"{route.method} {route.path} has no rule"
        for who in ("anonymous", "radiologist", "admin"):
            expected = getattr(rule, who)
            call = (rule.call or (lambda w, p=route.path: Call(p)))(world)
            if route.key == ("POST", "/login"):
                with TestClient(app, base_url="https://testserver", follow_redirects=False) as anyone:
                    response = login_call(anyone, "root" if who == "admin" else "smith")
            elif rule.csrf and expected not in (LOGIN, DENIED):
                problems += csrf_refusals(app, db, route, who, call)
                with own_session(app, who) as (client, token):
                    call = (rule.call or (lambda w, p=route.path: Call(p)))(world)  # a fresh draft for the call that succeeds
                    response = send(client, route.method, call, token)
            else:
                before = denials(db)
                response = send(world.clients[who], route.method, call, world.csrf.get(who))
                if expected == DENIED and denials(db) != before + 1:
                    problems.append(f"{who} {route.method} {route.path}: the refusal was not audited as auth.access_denied")
            problem = check(route, who, expected, response, rule.location)
            if problem:
                problems.append(problem)
    assert problems == [], "authorization matrix mismatches:\n" + "\n".join(problems)


def csrf_refusals(app: Any, db: Any, route: RouteInfo, who: str, call: Call) -> list[str]:
    """A state-changing call of the right caller without the CSRF token, and with a wrong one: 403, audited, nothing decided."""
    problems = []
    with own_session(app, who) as (client, token):
        for label, given in (("no CSRF token", None), ("a wrong CSRF token", "wrong-" + token)):
            before, decided = denials(db), decisions(db)
            response = send(client, route.method, call, given)
            allowed = (403, 422) if route.is_admin else (403,)  # 422: a generated body refused before the handler ran
            if response.status_code not in allowed:
                problems.append(f"{who} {route.method} {route.path} with {label}: got {response.status_code}, expected 403")
            elif response.status_code == 403 and denials(db) != before + 1:
                problems.append(f"{who} {route.method} {route.path} with {label}: refusal not audited")
            if decisions(db) != decided:
                problems.append(f"{who} {route.method} {route.path} with {label}: a decision was recorded anyway")
        if route.path == "/logout" and client.get("/api/me").status_code != 200:
            problems.append(f"{who} POST /logout without a CSRF token ended the session")
    return problems


def test_login_needs_its_form_token(client, accounts, db):
    """POST /login is reachable by anyone, so its CSRF defence is the form token matching the form's cookie."""
    client.get("/login")
    response = client.post("/login", data={"username": "smith", "password": PASSWORD, "login_csrf": "forged", "next": "/"})
    assert response.status_code == 400 and "medcap_session" not in response.cookies
    with db.session() as s:
        assert s.scalar(select(func.count()).where(AuditEvent.action == "auth.login")) == 0
