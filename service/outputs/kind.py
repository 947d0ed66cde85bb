"""The interface of an output kind, and the set of kinds a deployment uses (see service/outputs)."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.schema import SRDocument


@dataclass(frozen=True)
class Artefact:
    """A built output: the file that is sent, what it is, and its digest."""

    path: Path
    media_type: str
    sha256: str

    def __post_init__(self) -> None:
        if not isinstance(self.path, str | Path):
            raise TypeError(f"Artefact.path must be a path, got {type(self.path).__name__}")
        object.__setattr__(self, "path", Path(self.path))
        if not self.media_type or "/" not in self.media_type:
            raise ValueError(f"Artefact.media_type must be a media type such as application/dicom, got {self.media_type!r}")
        if len(self.sha256) != 64:
            raise ValueError(f"Artefact.sha256 must be 64 hex digits, got {self.sha256!r}")


@dataclass(frozen=True)
class Delivery:
    """What one attempt to send an artefact came to.

    ``delivered``: the peer has it. ``retryable``: not delivered, but a later attempt may succeed
    (peer down, busy, timed out). ``items``: per-item answers for the attempt's record (for DICOM,
    one per instance: its SOP instance UID and the C-STORE status).
    """

    delivered: bool
    retryable: bool
    summary: str
    items: tuple[dict[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.delivered and self.retryable:
            raise ValueError("Delivery.retryable must be False when delivered")
        if not self.summary:
            raise ValueError("Delivery.summary must say what happened")


class OutputKind(abc.ABC):
    """One kind of output: how it is built from a report and sent to a destination of its kind."""

    #: stored in ``outputs.kind``: never change it once rows exist
    name: str
    media_type: str

    @abc.abstractmethod
    def accepts(self, destination: str) -> bool:
        """Whether ``destination`` (a configured destination string) is one of this kind's."""

    @abc.abstractmethod
    def build(self, report: SRDocument) -> Artefact:
        """The artefact for ``report``; called once per report, in the report's transaction."""

    @abc.abstractmethod
    def send(self, artefact: Artefact, destination: str) -> Delivery:
        """One attempt to send ``artefact``; trouble with the peer is a Delivery, not an exception."""


class OutputKinds:
    """The output kinds a deployment uses; finds the kind of each destination."""

    def __init__(self, kinds: Sequence[OutputKind]) -> None:
        if not kinds:
            raise ValueError("OutputKinds.kinds: at least one output kind is needed")
        names = [k.name for k in kinds]
        if len(set(names)) != len(names):
            raise ValueError(f"OutputKinds.kinds: names must be unique, got {names}")
        self._kinds = {k.name: k for k in kinds}

    def __iter__(self) -> Iterator[OutputKind]:
        return iter(self._kinds.values())

    def get(self, name: str) -> OutputKind:
        try:
            return self._kinds[name]
        except KeyError:
            raise LookupError(f"no output kind {name!r} is configured (known: {', '.join(self._kinds)})") from None

    def for_destination(self, destination: str) -> OutputKind:
        for kind in self._kinds.values():
            if kind.accepts(destination):
                return kind
        raise ValueError(f"destination {destination!r} is not one of any output kind's ({', '.join(self._kinds)})")
