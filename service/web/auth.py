"""Sign-in, sessions, CSRF and throttling for the review app.

The session cookie carries a random token (Secure, HttpOnly, SameSite=Strict); the database keeps
only its SHA-256, the user, an expiry and a per-session CSRF token that every state-changing
request must echo (form field ``csrf_token`` or header ``X-CSRF-Token``). Sign-in is refused for a
while after ``login_max_failures`` failures for the same user name or from the same address within
15 minutes; every attempt is an audit event.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, or_, select, update

from service import audit
from service.audit import Action
from service.clock import Clock
from service.database import Database
from service.schema import AuditEvent, WebSession
from service.users import Account, Users

COOKIE = "medcap_session"
THROTTLE_WINDOW = timedelta(minutes=15)
# Sign-ins for one user name or from one address run one at a time (in this process): otherwise
# concurrent wrong passwords all pass the failure count before any is recorded (issue 12: 40 at
# once let 6 through a limit of 5). Striped, so an attacker's made-up names cannot grow a table.
_STRIPES = [threading.Lock() for _ in range(64)]


def _stripes(*keys: str) -> list[threading.Lock]:
    return [_STRIPES[i] for i in sorted({int(hashlib.sha256(k.encode()).hexdigest()[:8], 16) % len(_STRIPES) for k in keys})]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def address_actor(address: str) -> str:
    """Who tried to sign in, before we know who they are."""
    return f"web:{address}"


@dataclass(frozen=True)
class SignedIn:
    account: Account
    csrf_token: str
    token: str


class LoginThrottled(Exception):
    pass


class Sessions:
    def __init__(self, db: Database, clock: Clock, users: Users, *, hours: float, max_failures: int) -> None:
        self.db = db
        self.clock = clock
        self.users = users
        self.lifetime = timedelta(hours=hours)
        self.max_failures = max_failures

    def sign_in(self, username: str, password: str, address: str) -> SignedIn | None:
        """A new session, or None for wrong credentials; raises LoginThrottled after too many failures."""
        username = username.replace("\x00", "\ufffd")  # PostgreSQL text cannot hold NUL: a typed one is just a wrong name
        with ExitStack() as held:
            for lock in _stripes(f"user:{username[:128]}", f"address:{address}"):  # in a fixed order: no deadlock
                held.enter_context(lock)
            return self._sign_in(username, password, address)

    def _sign_in(self, username: str, password: str, address: str) -> SignedIn | None:
        now = self.clock.now()
        if self._recent_failures(username, address) >= self.max_failures:
            with self.db.session() as s:
                audit.record(s, now, address_actor(address), Action.LOGIN_THROTTLED, "user", username[:128], address=address)
            raise LoginThrottled
        account = self.users.authenticate(username, password)
        with self.db.session() as s:
            if account is None:
                audit.record(s, now, address_actor(address), Action.LOGIN_FAILED, "user", username[:128], address=address)
                return None
            token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
            s.add(
                WebSession(
                    token_sha256=_digest(token),
                    user_id=account.id,
                    csrf_token=csrf,
                    created_at=now,
                    last_seen_at=now,
                    expires_at=now + self.lifetime,
                    address=address[:45],
                )
            )
            audit.record(s, now, audit.web_actor(account.username), Action.LOGIN_SUCCEEDED, "user", account.username, address=address)
        return SignedIn(account, csrf, token)

    def lookup(self, token: str | None) -> SignedIn | None:
        """The live session for a cookie value: not expired, not revoked, its user still enabled."""
        if not token:
            return None
        now = self.clock.now()
        with self.db.session() as s:
            session = s.scalar(select(WebSession).where(WebSession.token_sha256 == _digest(token)))
            if session is None or session.revoked_at is not None or session.expires_at <= now:
                return None
            user_id, csrf = session.user_id, session.csrf_token
            if now - session.last_seen_at > timedelta(minutes=1):  # one write a minute at most
                session.last_seen_at = now
        account = self.users.get(user_id)
        return SignedIn(account, csrf, token) if account else None

    def sign_out(self, signed_in: SignedIn, address: str) -> None:
        now = self.clock.now()
        with self.db.session() as s:
            s.execute(update(WebSession).where(WebSession.token_sha256 == _digest(signed_in.token)).values(revoked_at=now))
            audit.record(
                s, now, audit.web_actor(signed_in.account.username), Action.LOGOUT, "user", signed_in.account.username, address=address
            )

    def _recent_failures(self, username: str, address: str) -> int:
        since = self.clock.now() - THROTTLE_WINDOW
        with self.db.session() as s:
            return (
                s.scalar(
                    select(func.count()).where(
                        AuditEvent.action == Action.LOGIN_FAILED.value,
                        AuditEvent.at >= since,
                        or_(AuditEvent.object_id == username[:128], AuditEvent.actor == address_actor(address)),
                    )
                )
                or 0
            )


def csrf_matches(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), str(given).encode())
