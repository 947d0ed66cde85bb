"""The web app under test: the real app on the real database, driven over HTTP(S) by httpx."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.users import Users
from service.web.app import create_app

PASSWORD = "correct horse battery staple"


@pytest.fixture
def accounts(db, clock):
    users = Users(db, clock)
    return {
        "radiologist": users.add("smith", "Smith^Jane", "radiologist", PASSWORD, "cli:test"),
        "radiologist2": users.add("jones", "Jones^Tom", "radiologist", PASSWORD, "cli:test"),
        "admin": users.add("root", "Admin^Ann", "admin", PASSWORD, "cli:test"),
    }


@pytest.fixture
def app(db, clock, settings):
    return create_app(settings, db, clock)


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    # https: the session cookie is Secure, so a client only sends it back over TLS (or to localhost).
    with TestClient(app, base_url="https://testserver", follow_redirects=False) as c:
        yield c


def sign_in(client: TestClient, username: str, password: str = PASSWORD) -> str:
    """Sign in through the form, as a browser does; returns the session's CSRF token."""
    page = client.get("/login")
    token = re.search(r'name="login_csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    response = client.post("/login", data={"username": username, "password": password, "login_csrf": token, "next": "/"})
    assert response.status_code == 303, response.text
    return client.get("/api/me").json()["csrf_token"]
