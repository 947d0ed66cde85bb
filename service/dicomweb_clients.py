"""The programs allowed to send us instances over DICOMweb (STOW-RS), and how a request proves it is one.

Default-deny, like DICOM associations: a request must carry ``Authorization: Bearer TOKEN`` with
the token of a registered client *and* come from one of that client's networks. Tokens are 256
random bits made here (``medcap dicomweb-client add`` prints one once); only their SHA-256 is
stored, so a copy of the database lets nobody in. This module owns the ``dicomweb_clients`` rows
and their audit events.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from service import audit
from service.audit import Action
from service.clock import Clock
from service.database import Database
from service.schema import DicomwebClient

# The name becomes the calling AE title of the client's requests (associations.calling_ae).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,15}$")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientError(ValueError):
    """A bad client name or network, or an unknown client; the message says which and why."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ClientError(f"client name {name!r}: use 1-16 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def parse_networks(text: str) -> tuple[Network, ...]:
    """``10.1.0.0/16,127.0.0.1`` -> networks; at least one, each a valid address or CIDR."""
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    if not parts:
        raise ClientError("networks: name at least one address or CIDR the client connects from (e.g. 10.1.2.3/32)")
    networks = []
    for part in parts:
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError as exc:
            raise ClientError(f"networks: {part!r}: {exc}") from None
    return tuple(networks)


def token_hash(token: str) -> str:
    # A 256-bit random token needs no slow hash: guessing it is already hopeless.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class Client:
    id: int
    name: str
    networks: tuple[Network, ...]

    def admits(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)


@dataclass(frozen=True)
class Refusal:
    """Why a request was not let in: HTTP 401 (no or unknown credentials) or 403 (known client, wrong network)."""

    status: int
    reason: str
    client: str | None = None


class DicomwebClients:
    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    def add(self, name: str, networks: str, actor: str) -> tuple[Client, str]:
        """Register a client; returns it and its token (shown once, never stored)."""
        name = check_name(name)
        parsed = parse_networks(networks)
        token = secrets.token_urlsafe(32)
        now = self.clock.now()
        try:
            with self.db.session() as s:
                row = DicomwebClient(
                    name=name,
                    token_sha256=token_hash(token),
                    networks=",".join(str(n) for n in parsed),
                    created_at=now,
                    created_by=actor,
                )
                s.add(row)
                s.flush()
                audit.record(s, now, actor, Action.DICOMWEB_CLIENT_ADDED, "dicomweb_client", name, networks=row.networks)
                client = Client(row.id, name, parsed)
        except IntegrityError:
            raise ClientError(f"client {name!r} exists already (remove it first to issue a new token)") from None
        return client, token

    def remove(self, name: str, actor: str) -> None:
        now = self.clock.now()
        with self.db.session() as s:
            gone = s.execute(delete(DicomwebClient).where(DicomwebClient.name == name).returning(DicomwebClient.id)).first()
            if gone is None:
                raise ClientError(f"no DICOMweb client named {name!r}")
            audit.record(s, now, actor, Action.DICOMWEB_CLIENT_REMOVED, "dicomweb_client", name)

    def list(self) -> list[tuple[Client, str]]:
        """Every client with who added it and when, by name."""
        with self.db.session() as s:
            rows = s.scalars(select(DicomwebClient).order_by(DicomwebClient.name)).all()
            return [
                (Client(r.id, r.name, parse_networks(r.networks)), f"added {r.created_at:%Y-%m-%d %H:%M} UTC by {r.created_by}")
                for r in rows
            ]

    def authenticate(self, authorization: str | None, address: str) -> Client | Refusal:
        """The client a request's ``Authorization`` header names, if it may connect from ``address``."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Refusal(401, "no bearer token (send Authorization: Bearer TOKEN)")
        with self.db.session() as s:
            row = s.scalar(select(DicomwebClient).where(DicomwebClient.token_sha256 == token_hash(token.strip())))
            if row is None:
                return Refusal(401, "unknown bearer token")
            client = Client(row.id, row.name, parse_networks(row.networks))
        if not client.admits(address):
            return Refusal(403, f"client {client.name} may not connect from {address}", client.name)
        return client
