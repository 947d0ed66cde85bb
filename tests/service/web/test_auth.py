"""Signing in and out, sessions, throttling, cookies, redirects, headers and the audit trail of the review app,
over HTTP(S) against the real app and database (both backends), with a manual clock."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.cookies import SimpleCookie
from urllib.parse import urljoin, urlsplit

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.schema import AuditEvent, SRDocument, WebSession
from service.users import Users
from service.web.app import create_app
from service.web.auth import COOKIE, THROTTLE_WINDOW, LoginThrottled, Sessions
from service.web.pages import LOGIN_CSRF_COOKIE
from tests.service.web.conftest import PASSWORD, sign_in
from tests.service.web.test_authorization import clone_draft


@contextmanager
def browser(app, address: str = "testclient") -> Iterator[TestClient]:
    """A client of its own (its own cookies), calling from ``address``."""
    with TestClient(app, base_url="https://testserver", follow_redirects=False, client=(address, 50000)) as c:
        yield c


def attempt(client: TestClient, username: str, password: str = PASSWORD, next: str = "/"):
    """Fill in and send the sign-in form (fetching the form first, as a browser does)."""
    page = client.get("/login")
    token = re.search(r'name="login_csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    return client.post("/login", data={"username": username, "password": password, "login_csrf": token, "next": next})


def set_cookies(response) -> dict[str, dict[str, str | bool]]:
    """The Set-Cookie headers of a response, parsed: name → {value, attributes (lower case)}."""
    found: dict[str, dict[str, str | bool]] = {}
    for header in response.headers.get_list("set-cookie"):
        name, _, rest = header.partition("=")
        value, *attributes = rest.split(";")
        parsed: dict[str, str | bool] = {"value": value.strip().strip('"')}
        for attribute in attributes:
            key, sep, val = attribute.strip().partition("=")
            parsed[key.lower()] = val if sep else True
        found[name.strip()] = parsed
    return found


def events(db, action: str) -> list[AuditEvent]:
    with db.session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)))


# -- signing in and out --------------------------------------------------------------------------


def test_sign_in_and_out(app, accounts, db, clock):
    with browser(app) as c:
        assert c.get("/worklist").headers["location"] == "/login?next=/worklist"
        response = attempt(c, "smith")
        assert response.status_code == 303 and response.headers["location"] == "/worklist"
        token = c.cookies[COOKIE]
        me = c.get("/api/me").json()
        assert (me["username"], me["display_name"], me["role"]) == ("smith", "Smith^Jane", "radiologist")
        assert "Smith^Jane" not in c.get("/worklist").text and "Jane Smith" in c.get("/worklist").text  # readable name in the header

        signed_out = c.post("/logout", data={"csrf_token": me["csrf_token"]})
        assert signed_out.status_code == 303 and signed_out.headers["location"] == "/login"
        cleared = set_cookies(signed_out)[COOKIE]
        assert cleared["value"] == "" and cleared["max-age"] == "0"
        assert c.get("/api/me").status_code == 401
    with browser(app) as replay:  # the old cookie, kept by someone: revoked on the server, not just deleted in the browser
        replay.cookies.set(COOKIE, token)
        assert replay.get("/api/me").status_code == 401
    with browser(app) as admin:
        response = attempt(admin, "root")
        assert response.status_code == 303 and response.headers["location"] == "/admin"
    (login, _admin_login), (logout,) = events(db, "auth.login"), events(db, "auth.logout")
    assert (login.actor, login.object_id, login.details["address"], login.at) == ("user:smith", "smith", "testclient", clock.now())
    assert (logout.actor, logout.details["address"]) == ("user:smith", "testclient")


def test_the_session_token_is_stored_only_as_its_hash(app, accounts, db):
    with browser(app) as c:
        sign_in(c, "smith")
        token = c.cookies[COOKIE]
    with db.session() as s:
        (session,) = s.scalars(select(WebSession)).all()
    assert len(token) >= 40 and session.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
    assert token not in (session.csrf_token, session.token_sha256)


@pytest.mark.parametrize("username, password", [("smith", "wrong password!!"), ("nobody", PASSWORD), ("SMITH", PASSWORD)])
def test_wrong_password_or_unknown_user_get_the_same_answer(app, accounts, db, username, password):
    with browser(app, "10.0.0.9") as c:
        response = attempt(c, username, password)
        assert response.status_code == 401
        assert "Wrong user name or password, or the account is disabled." in response.text
        assert COOKIE not in set_cookies(response) and c.get("/api/me").status_code == 401
        assert LOGIN_CSRF_COOKIE in set_cookies(response)  # a fresh form to try again
    (failed,) = events(db, "auth.login_failed")
    assert (failed.actor, failed.object_id, failed.details["address"]) == ("web:10.0.0.9", username, "10.0.0.9")
    assert events(db, "auth.login") == []


def test_a_disabled_user_cannot_sign_in_and_their_live_session_stops(app, accounts, db, clock):
    users = Users(db, clock)
    with browser(app) as live:
        sign_in(live, "smith")
        users.set_disabled("smith", True, "cli:test")
        assert live.get("/api/me").status_code == 401
        assert live.get("/worklist").headers["location"] == "/login?next=/worklist"
        with browser(app) as again:
            response = attempt(again, "smith")
            assert response.status_code == 401 and "or the account is disabled" in response.text
        users.set_disabled("smith", False, "cli:test")
        with browser(app) as enabled:
            assert attempt(enabled, "smith").status_code == 303
    assert [e.object_id for e in events(db, "user.disabled")] == ["smith"]


def test_sessions_from_before_a_disable_stay_ended_after_enabling(app, accounts, db, clock):
    users = Users(db, clock)
    with browser(app) as live:
        sign_in(live, "smith")
        users.set_disabled("smith", True, "cli:test")
        users.set_disabled("smith", False, "cli:test")
        assert live.get("/api/me").status_code == 401


def test_a_password_reset_ends_existing_sessions(app, accounts, db, clock):
    with browser(app) as live:
        sign_in(live, "smith")
        Users(db, clock).reset_password("smith", "a brand new passphrase", "cli:test")
        assert live.get("/api/me").status_code == 401


# -- throttling --------------------------------------------------------------------------------


@pytest.fixture
def strict_app(make_settings, db, clock):
    """The app with MEDCAP_LOGIN_MAX_FAILURES=3."""
    return create_app(make_settings(login_max_failures=3), db, clock)


def test_sign_in_is_throttled_per_user_name_for_15_minutes(strict_app, accounts, db, clock):
    with browser(strict_app, "10.0.0.1") as attacker, browser(strict_app, "10.0.0.2") as owner:
        for _ in range(3):
            assert attempt(attacker, "smith", "guess guess guess").status_code == 401
        # From another address, with the right password: the user name is locked for now.
        refused = attempt(owner, "smith")
        assert refused.status_code == 429 and "Too many failed sign-ins" in refused.text
        assert COOKIE not in set_cookies(refused)
        assert attempt(owner, "jones").status_code == 303  # other users, from an address without failures, are not affected
        clock.advance(THROTTLE_WINDOW.total_seconds() - 1)
        assert attempt(owner, "smith").status_code == 429
        clock.advance(2)
        assert attempt(owner, "smith").status_code == 303
    throttled = events(db, "auth.login_throttled")
    assert [(e.actor, e.object_id, e.details["address"]) for e in throttled] == [("web:10.0.0.2", "smith", "10.0.0.2")] * 2
    assert len(events(db, "auth.login_failed")) == 3  # throttled attempts are not failures: they do not extend the lock


def test_sign_in_is_throttled_per_address(strict_app, accounts, db, clock):
    with browser(strict_app, "10.0.0.3") as sprayer, browser(strict_app, "10.0.0.4") as elsewhere:
        for name in ("alice", "bob", "carol"):  # one guess each at many names
            assert attempt(sprayer, name, "password123456").status_code == 401
        assert attempt(sprayer, "jones").status_code == 429  # even the right password of a real user, from that address
        assert attempt(elsewhere, "jones").status_code == 303
        clock.advance(THROTTLE_WINDOW.total_seconds() + 1)
        assert attempt(sprayer, "jones").status_code == 303
    (throttled,) = events(db, "auth.login_throttled")
    assert (throttled.actor, throttled.object_id) == ("web:10.0.0.3", "jones")


def test_concurrent_wrong_passwords_get_no_more_tries_than_the_limit(db, clock, accounts):
    sessions = Sessions(db, clock, Users(db, clock), hours=8, max_failures=5)

    def guess(n: int) -> str:
        try:
            return "signed in" if sessions.sign_in("smith", f"wrong guess {n}", f"10.7.0.{n}") else "wrong"
        except LoginThrottled:
            return "throttled"

    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(guess, range(40)))
    assert answers.count("wrong") == 5 and answers.count("throttled") == 35
    assert len(events(db, "auth.login_failed")) == 5


def proxied(client: TestClient, forwarded_for: str) -> None:
    client.headers["X-Forwarded-For"] = forwarded_for


def test_behind_a_trusted_proxy_each_client_is_throttled_by_its_own_address(make_settings, accounts, db, clock):
    app = create_app(make_settings(login_max_failures=3, web_trusted_proxies="10.9.0.0/24,10.9.1.1"), db, clock)
    # Both users come through the same reverse proxy (10.9.0.7), which itself sits behind 10.9.1.1.
    with browser(app, "10.9.1.1") as sprayer, browser(app, "10.9.1.1") as colleague:
        proxied(sprayer, "192.0.2.50, 10.9.0.7")
        proxied(colleague, "198.51.100.8, 10.9.0.7")
        for name in ("alice", "bob", "carol"):
            assert attempt(sprayer, name, "password123456").status_code == 401
        assert attempt(sprayer, "jones").status_code == 429
        assert attempt(colleague, "jones").status_code == 303, "one client's failures lock out only that client"
    assert {e.actor for e in events(db, "auth.login_failed")} == {"web:192.0.2.50"}
    (signed_in,) = events(db, "auth.login")
    assert signed_in.details["address"] == "198.51.100.8"


@pytest.mark.parametrize(
    ("peer", "forwarded", "seen"),
    [
        ("10.0.0.3", "192.0.2.1", "10.0.0.3"),  # not a configured proxy: its header is the client's own text
        ("10.9.0.7", "192.0.2.1", "192.0.2.1"),
        ("10.9.0.7", "203.0.113.9, 192.0.2.1", "192.0.2.1"),  # a client cannot pick its address by sending the header itself
        ("10.9.0.7", "192.0.2.1, not-an-address", "10.9.0.7"),
        ("10.9.0.7", "", "10.9.0.7"),
    ],
)
def test_x_forwarded_for_is_honoured_only_from_configured_proxies(make_settings, accounts, db, clock, peer, forwarded, seen):
    app = create_app(make_settings(web_trusted_proxies="10.9.0.0/24"), db, clock)
    with browser(app, peer) as c:
        if forwarded:
            proxied(c, forwarded)
        assert attempt(c, "smith", "wrong wrong wrong").status_code == 401
    (failed,) = events(db, "auth.login_failed")
    assert failed.actor == f"web:{seen}"


def test_by_default_x_forwarded_for_is_ignored(app, accounts, db):
    with browser(app, "10.0.0.3") as c:
        proxied(c, "192.0.2.1")
        assert attempt(c, "smith", "wrong wrong wrong").status_code == 401
    assert [e.actor for e in events(db, "auth.login_failed")] == ["web:10.0.0.3"]


# -- sessions and cookies ------------------------------------------------------------------------


def test_a_session_expires_after_the_configured_hours(app, accounts, clock, settings):
    with browser(app) as c:
        sign_in(c, "smith")
        clock.advance(settings.session_hours * 3600 - 60)
        assert c.get("/api/me").status_code == 200
        clock.advance(61)
        assert c.get("/api/me").status_code == 401
        assert c.get("/worklist").headers["location"] == "/login?next=/worklist"
        assert attempt(c, "smith").status_code == 303  # signing in again gives a new session
        assert c.get("/api/me").status_code == 200


def test_cookie_flags(app, accounts, settings):
    with browser(app) as c:
        form = c.get("/login")
        login_cookie = set_cookies(form)[LOGIN_CSRF_COOKIE]
        assert login_cookie["secure"] is True and login_cookie["httponly"] is True and login_cookie["samesite"].lower() == "strict"
        token = re.search(r'name="login_csrf" value="([^"]+)"', form.text).group(1)
        assert login_cookie["value"] == token  # double submit: the form field must match the cookie
        response = c.post("/login", data={"username": "smith", "password": PASSWORD, "login_csrf": token, "next": "/"})
        cookies = set_cookies(response)
        session = cookies[COOKIE]
        assert session["secure"] is True and session["httponly"] is True and session["samesite"].lower() == "strict"
        assert session["path"] == "/" and int(session["max-age"]) == int(settings.session_hours * 3600)
        assert "domain" not in session  # host-only
        assert cookies[LOGIN_CSRF_COOKIE]["max-age"] == "0"  # the form token is used up
        # The raw header, as a browser reads it:
        (raw,) = [h for h in response.headers.get_list("set-cookie") if h.startswith(f"{COOKIE}=")]
        assert SimpleCookie(raw)[COOKIE]["secure"] and SimpleCookie(raw)[COOKIE]["httponly"]


def test_the_login_form_needs_its_csrf_cookie(app, accounts, db):
    with browser(app) as c:
        page = c.get("/login")
        token = re.search(r'name="login_csrf" value="([^"]+)"', page.text).group(1)
        for label, field, cookie in (("no field", "", token), ("wrong field", "forged", token), ("no cookie", token, None)):
            c.cookies.clear()
            if cookie:
                c.cookies.set(LOGIN_CSRF_COOKIE, cookie)
            response = c.post("/login", data={"username": "smith", "password": PASSWORD, "login_csrf": field, "next": "/"})
            assert response.status_code == 400, label
            assert "Your sign-in form expired" in response.text and COOKIE not in set_cookies(response), label
    with browser(app) as fresh:  # a page from another site posting the form cannot know the cookie's value
        response = fresh.post("/login", data={"username": "smith", "password": PASSWORD, "next": "/"})
        assert response.status_code == 400
    assert events(db, "auth.login") == []


@pytest.mark.parametrize("field", ["tökén", "\u202e", "🙂" * 40])
def test_a_non_ascii_sign_in_token_is_refused_not_a_server_error(app, accounts, db, field):
    with browser(app) as c:
        c.get("/login")
        response = c.post("/login", data={"username": "smith", "password": PASSWORD, "login_csrf": field, "next": "/"})
    assert response.status_code == 400 and "Your sign-in form expired" in response.text
    assert response.headers["x-frame-options"] == "DENY"
    assert events(db, "auth.login") == []


def test_a_user_name_with_a_nul_is_a_wrong_user_name(app, accounts, db):
    with browser(app) as c:
        assert attempt(c, "smith\x00", PASSWORD).status_code == 401
    (failed,) = events(db, "auth.login_failed")
    assert failed.object_id == "smith\ufffd"


def test_a_server_error_carries_the_security_headers(app):
    def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)
    with TestClient(app, base_url="https://testserver", raise_server_exceptions=False) as c:
        response = c.get("/boom")
    assert response.status_code == 500 and "a bug" not in response.text
    h = response.headers
    assert "default-src 'self'" in h["content-security-policy"] and h["x-frame-options"] == "DENY"
    assert (h["x-content-type-options"], h["referrer-policy"], h["cache-control"]) == ("nosniff", "no-referrer", "no-store")


# -- redirects after sign-in ---------------------------------------------------------------------


def lands_on_this_site(location: str) -> bool:
    """Where a browser goes for this Location (backslashes count as slashes, tabs and newlines are dropped)."""
    normalised = re.sub(r"[\t\n\r]", "", location).replace("\\", "/")
    target = urlsplit(urljoin("https://testserver/worklist", normalised))
    return (target.scheme, target.netloc) == ("https", "testserver")


OFF_SITE = [
    "https://evil.example/",
    "//evil.example/x",
    "/\\evil.example",
    "\\\\evil.example",
    "/\t/evil.example",
    "javascript:alert(1)",
    "evil.example",
    "///evil.example",
    "https:evil.example",
]


def test_next_cannot_send_a_signed_in_user_elsewhere(app, accounts):
    for target in OFF_SITE:
        with browser(app) as c:
            response = attempt(c, "smith", next=target)
            assert response.status_code == 303, target
            location = response.headers["location"]
            assert lands_on_this_site(location), (target, location)
            # Either the default page, or the path as given with its odd characters escaped ("/%5Cevil.example").
            assert location == "/worklist" or re.match(r"^/%(5C|09)", location), (target, location)


@pytest.mark.peers
def test_next_leads_back_to_the_page_asked_for(app, accounts, draft_id):
    with browser(app) as c:
        first = c.get(f"/drafts/{draft_id}")
        assert first.headers["location"] == f"/login?next=/drafts/{draft_id}"
        page = c.get(first.headers["location"])
        assert f'name="next" value="/drafts/{draft_id}"' in page.text
        response = attempt(c, "smith", next=f"/drafts/{draft_id}")
        assert response.headers["location"] == f"/drafts/{draft_id}"
        assert c.get(response.headers["location"]).status_code == 200


# -- headers ---------------------------------------------------------------------------------------


@pytest.mark.peers
def test_security_headers_on_every_kind_of_response(app, accounts, draft_id):
    with browser(app) as c:
        sign_in(c, "smith")
        responses = {
            path: c.get(path)
            for path in (
                "/login",
                "/worklist",
                f"/drafts/{draft_id}",
                "/api/me",
                "/api/drafts",
                "/static/medcap.css",
                "/no/such/page",
                "/api/drafts/x",
            )
        }
    with browser(app) as anonymous:
        responses["/worklist (anonymous)"] = anonymous.get("/worklist")
        responses["/api/me (anonymous)"] = anonymous.get("/api/me")
    for path, response in responses.items():
        h = response.headers
        assert "default-src 'self'" in h["content-security-policy"] and "frame-ancestors 'none'" in h["content-security-policy"], path
        assert "'unsafe-inline'" not in h["content-security-policy"] and "'unsafe-eval'" not in h["content-security-policy"], path
        assert (h["x-content-type-options"], h["x-frame-options"], h["referrer-policy"]) == ("nosniff", "DENY", "no-referrer"), path
        if path != "/static/medcap.css":
            assert h["cache-control"] == "no-store", path  # patient data stays out of caches


# -- the audit trail -----------------------------------------------------------------------------


@pytest.mark.peers
def test_every_study_view_and_action_is_an_audit_event_with_who_when_what_and_where_from(app, accounts, db, clock, draft_id):
    second = clone_draft(db, draft_id)
    with db.session() as s:
        uids = {d: s.get(SRDocument, d).sop_instance_uid for d in (draft_id, second)}
    with browser(app, "10.1.2.3") as c, browser(app, "10.9.9.9") as admin:
        csrf = sign_in(c, "smith")
        sign_in(admin, "root")
        steps = [
            ("worklist.viewed", "all", lambda: c.get("/worklist", params={"state": ""})),
            ("study.viewed", uids[draft_id], lambda: c.get(f"/drafts/{draft_id}")),
            ("worklist.viewed", "awaiting review", lambda: c.get("/api/drafts")),
            ("study.viewed", uids[second], lambda: c.get(f"/api/drafts/{second}")),
            (
                "draft.approved",
                uids[draft_id],
                lambda: c.post(f"/drafts/{draft_id}/approve", data={"csrf_token": csrf, "impression": "Normal."}),
            ),
            (
                "draft.rejected",
                uids[second],
                lambda: c.post(f"/api/drafts/{second}/reject", json={"reason": "Motion."}, headers={"X-CSRF-Token": csrf}),
            ),
            ("auth.logout", "smith", lambda: c.post("/logout", data={"csrf_token": csrf})),
        ]
        for n, (action, object_id, step) in enumerate(steps):
            at = clock.advance(60)
            response = step()
            assert response.status_code < 500, (action, response.text)
            found = [e for e in events(db, action) if e.at == at]
            assert len(found) == 1, f"step {n}: {action} at {at}: {[(e.action, e.at) for e in events(db, action)]}"
            event = found[0]
            assert (event.actor, event.object_id, event.details["address"]) == ("user:smith", object_id, "10.1.2.3"), action
            if action.startswith(("study.", "draft.")):
                assert event.study_uid, action
        at = clock.advance(60)
        assert admin.get(f"/drafts/{draft_id}").status_code == 403
        (denied,) = events(db, "auth.access_denied")
        assert (denied.actor, denied.at, denied.object_id, denied.details) == (
            "user:root",
            at,
            f"GET /drafts/{draft_id}",
            {"reason": "this needs the radiologist role", "address": "10.9.9.9"},
        )
