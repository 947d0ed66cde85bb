"""Local accounts of the review app: who may sign in, in which role, with which password.

There is no default account: the first admin is made with ``medcap users add``, the password read
from stdin. Passwords are stored as argon2id hashes (argon2-cffi's defaults, RFC 9106's
low-memory profile); a hash made with older parameters is upgraded at the next sign-in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from zxcvbn import zxcvbn

from service import audit
from service.audit import Action
from service.clock import Clock
from service.database import Database
from service.schema import Role, User, WebSession

MIN_PASSWORD_LENGTH = 12
# zxcvbn (Dropbox's estimator; PyPI package ``zxcvbn``) matches a password against its maintained
# lists (30,000 common passwords, English words, names), with repeats, sequences, keyboard walks
# and l33t; score 3 means "safely unguessable" online (about 10^8 guesses). Only the first
# characters are scored: its matching grows with length, and a long password passes anyway.
MIN_PASSWORD_SCORE = 3
SCORED_CHARACTERS = 64
_USERNAME = re.compile(r"^[a-z][a-z0-9._-]{1,63}$")
_HASHER = PasswordHasher()
# Compared against when the user does not exist, so that a wrong user name costs as long as a wrong password.
_DUMMY_HASH = _HASHER.hash("not a password of anyone")


class UserError(ValueError):
    """A bad user name, role, display name or password; the message says which and why."""


@dataclass(frozen=True)
class Account:
    """What the app needs to know about a signed-in user."""

    id: int
    username: str
    display_name: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    @property
    def readable_name(self) -> str:
        family, _, given = self.display_name.partition("^")
        return f"{given.split('^')[0]} {family}".strip() if given else family


def check_username(username: str) -> str:
    if not isinstance(username, str) or not _USERNAME.fullmatch(username):
        raise UserError(f"user name {username!r}: use 2-64 lower-case letters, digits, '.', '_' or '-', starting with a letter")
    return username


def check_display_name(name: str) -> str:
    """A DICOM person name (it becomes the SR's verifying observer): Family^Given[^Middle^Prefix^Suffix]."""
    if not isinstance(name, str) or "^" not in name or not name.split("^")[0].strip() or len(name) > 64 * 5:
        raise UserError(f"display name {name!r}: write it as a DICOM person name, Family^Given (e.g. Smith^Jane)")
    if any(ch in name for ch in "\\=\n\r\t"):
        raise UserError(f"display name {name!r}: no backslashes, '=' or control characters")
    return name


def check_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise UserError(f"role {role!r}: choose {' or '.join(r.value for r in Role)}") from None


def check_password(password: str) -> str:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"password: at least {MIN_PASSWORD_LENGTH} characters")
    if password.strip() != password or "\n" in password:
        raise UserError("password: no leading or trailing spaces, no line breaks")
    estimate = zxcvbn(password[:SCORED_CHARACTERS])
    if estimate["score"] < MIN_PASSWORD_SCORE:
        why = estimate["feedback"]["warning"] or "it is too easy to guess"
        raise UserError(f"password: {why.rstrip('.')}; choose a longer passphrase of uncommon words")
    return password


def _end_sessions(s: Session, username: str, now: datetime) -> None:
    user_id = select(User.id).where(User.username == username).scalar_subquery()
    s.execute(update(WebSession).where(WebSession.user_id == user_id, WebSession.revoked_at.is_(None)).values(revoked_at=now))


class Users:
    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    def add(self, username: str, display_name: str, role: str, password: str, actor: str) -> Account:
        username, display_name, role_ = check_username(username), check_display_name(display_name), check_role(role)
        hashed = _HASHER.hash(check_password(password))
        now = self.clock.now()
        try:
            with self.db.session() as s:
                user = User(
                    username=username,
                    display_name=display_name,
                    role=role_.value,
                    password_hash=hashed,
                    disabled=False,
                    created_at=now,
                    password_changed_at=now,
                )
                s.add(user)
                s.flush()
                audit.record(s, now, actor, Action.USER_ADDED, "user", username, role=role_.value, display_name=display_name)
                return Account(user.id, username, display_name, role_)
        except IntegrityError:
            raise UserError(f"user {username!r} exists already") from None

    def set_disabled(self, username: str, disabled: bool, actor: str) -> None:
        now = self.clock.now()
        with self.db.session() as s:
            changed = s.execute(update(User).where(User.username == username).values(disabled=disabled)).rowcount  # type: ignore[attr-defined]
            if not changed:
                raise UserError(f"there is no user {username!r}")
            if disabled:  # ended for good: enabling the user again does not revive them
                _end_sessions(s, username, now)
            audit.record(s, now, actor, Action.USER_DISABLED if disabled else Action.USER_ENABLED, "user", username)

    def reset_password(self, username: str, password: str, actor: str) -> None:
        hashed = _HASHER.hash(check_password(password))
        now = self.clock.now()
        with self.db.session() as s:
            changed = s.execute(
                update(User).where(User.username == username).values(password_hash=hashed, password_changed_at=now)
            ).rowcount  # type: ignore[attr-defined]
            if not changed:
                raise UserError(f"there is no user {username!r}")
            _end_sessions(s, username, now)  # whoever knew the old password is signed out
            audit.record(s, now, actor, Action.USER_PASSWORD_RESET, "user", username)

    def authenticate(self, username: str, password: str) -> Account | None:
        """The account if the password matches an enabled user; None otherwise (no hint which part was wrong)."""
        with self.db.session() as s:
            user = s.scalar(select(User).where(User.username == username))
            try:
                _HASHER.verify(user.password_hash if user else _DUMMY_HASH, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return None
            if user is None or user.disabled:
                return None
            if _HASHER.check_needs_rehash(user.password_hash):
                user.password_hash = _HASHER.hash(password)
            return Account(user.id, user.username, user.display_name, Role(user.role))

    def get(self, user_id: int) -> Account | None:
        """An enabled account by id (a disabled user's sessions stop working at once)."""
        with self.db.session() as s:
            user = s.get(User, user_id)
            if user is None or user.disabled:
                return None
            return Account(user.id, user.username, user.display_name, Role(user.role))

    def list(self) -> list[tuple[Account, bool]]:
        with self.db.session() as s:
            return [
                (Account(u.id, u.username, u.display_name, Role(u.role)), u.disabled)
                for u in s.scalars(select(User).order_by(User.username))
            ]
