"""Outputs: what MedCap makes of a report for the systems downstream, and how each kind is sent.

A report (a draft or verified :class:`~service.schema.SRDocument`) becomes one :class:`Output`
row per output kind, built once; a :class:`~service.schema.Dispatch` sends that output to one
destination of its kind (service/dispatch_lifecycle.py owns the dispatch's statuses and
attempts). A new kind (an HL7 message, a FHIR resource, STOW-RS) is one module here with a
class implementing :class:`OutputKind`, added to :data:`KNOWN` — no schema change, no new task:

* ``accepts(destination)``: whether a configured destination string is one of this kind's
  (``AE@host:port`` for DICOM, a URL for DICOMweb or FHIR, ``mllp://`` for HL7).
* ``build(report)``: the artefact for the report (a file under the data directory).
* ``send(artefact, destination)``: one attempt, answering a :class:`Delivery` (never raising for
  a peer that is down or refuses).

This module owns the ``outputs`` rows: :func:`ensure` is the one place they are created.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import audit
from service.audit import Action
from service.outputs.dicom_sr import DicomSR
from service.outputs.fhir_report import FhirReport
from service.outputs.hl7_oru import Hl7Oru
from service.outputs.kind import Artefact, Delivery, OutputKind, OutputKinds
from service.outputs.stow_rs import StowRS
from service.schema import Output, SRDocument

if TYPE_CHECKING:
    from service.settings import Settings

__all__ = [
    "Artefact",
    "Delivery",
    "DicomSR",
    "FhirReport",
    "Hl7Oru",
    "OutputKind",
    "OutputKinds",
    "StowRS",
    "artefact_of",
    "configured",
    "default",
    "ensure",
]


def ensure(s: Session, now: datetime, actor: str, report: SRDocument, kind: OutputKind, study_uid: str | None) -> Output:
    """The ``kind`` output of ``report``: built and recorded the first time, found after that."""
    existing = s.scalar(select(Output).where(Output.report_id == report.id, Output.kind == kind.name))
    if existing is not None:
        return existing
    artefact = kind.build(report)
    output = Output(
        report_id=report.id,
        kind=kind.name,
        media_type=artefact.media_type,
        path=str(artefact.path),
        sha256=artefact.sha256,
        created_at=now,
    )
    s.add(output)
    s.flush()
    audit.record(
        s, now, actor, Action.OUTPUT_BUILT, "output", output.id, study_uid=study_uid, kind=kind.name, report=report.sop_instance_uid
    )
    return output


def artefact_of(output: Output) -> Artefact:
    return Artefact(Path(output.path), output.media_type, output.sha256)


#: a factory per output kind MedCap knows (settings → kind): a new kind is added here
KNOWN: tuple[Callable[[Settings], OutputKind], ...] = (
    DicomSR.from_settings,
    StowRS.from_settings,
    Hl7Oru.from_settings,
    FhirReport.from_settings,
)


def configured(settings: Settings) -> OutputKinds:
    """Every kind MedCap knows, set up from ``settings``."""
    return OutputKinds([make(settings) for make in KNOWN])


def default() -> OutputKinds:
    """The DICOM SR over C-STORE with default settings (what code without settings, and tests, use)."""
    return OutputKinds([DicomSR()])
