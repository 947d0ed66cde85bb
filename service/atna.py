"""DICOM audit messages (PS3.15 A.5, the IHE ATNA format) made from audit events.

Each event of ``service.audit.ATNA_ACTIONS`` becomes one ``AuditMessage``: the event's code and
outcome, who took part (the user or peer, and MedCap itself), the audit source, and the objects
(study, patient, query) it concerns, looked up in the database where the event row names only an
association or a dispatch. Every message is checked against the DICOM audit message schema
(PS3.15 A.5.1, vendored in ``schemas/``) before it leaves: a message that does not validate is a
bug here, and is kept in the outbox with the error rather than sent.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from lxml import etree
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.audit import Action
from service.schema import AuditEvent, Dispatch, Draft, Instance, Output, SRDocument, Study

SCHEMA = Path(__file__).resolve().parent / "schemas" / "dicom-audit-message.rng"


class InvalidAuditMessage(ValueError):
    """A message that the DICOM audit message schema refuses (a bug in this module)."""


@dataclass(frozen=True)
class Code:
    code: str
    system: str
    meaning: str

    def element(self, parent: etree._Element, tag: str) -> etree._Element:
        return etree.SubElement(parent, tag, {"csd-code": self.code, "codeSystemName": self.system, "originalText": self.meaning})


def dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


# PS3.16 CID 400-405 (Audit Event ID, Event Type, Participant Role, Participant Object ID Type).
APPLICATION_ACTIVITY = dcm("110100", "Application Activity")
INSTANCES_ACCESSED = dcm("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = dcm("110104", "DICOM Instances Transferred")
EXPORT = dcm("110106", "Export")
QUERY = dcm("110112", "Query")
SECURITY_ALERT = dcm("110113", "Security Alert")
USER_AUTHENTICATION = dcm("110114", "User Authentication")
APPLICATION_START = dcm("110120", "Application Start")
APPLICATION_STOP = dcm("110121", "Application Stop")
LOGIN = dcm("110122", "Login")
LOGOUT = dcm("110123", "Logout")
NODE_AUTHENTICATION = dcm("110126", "Node Authentication")
APPLICATION = dcm("110150", "Application")
APPLICATION_LAUNCHER = dcm("110151", "Application Launcher")
DESTINATION = dcm("110152", "Destination Role ID")
SOURCE = dcm("110153", "Source Role ID")
DESTINATION_MEDIA = dcm("110154", "Destination Media")
STUDY_INSTANCE_UID = dcm("110180", "Study Instance UID")
NODE_ID = dcm("110182", "Node ID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
URI = Code("12", "RFC-3881", "URI")

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"  # our draft SRs' SOP class
AUDIT_TRAIL_URI = "medcap:audit_events"  # the object of audit searches and exports: our audit trail

SUCCESS, MINOR_FAILURE = "0", "4"
# XML 1.0 forbids most control characters; a user name typed into the sign-in form may carry them.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_ADDRESS = re.compile(r"^[0-9.]+$|:")


@dataclass(frozen=True)
class Source:
    """Who reports: AuditSourceIdentification, and MedCap as an active participant."""

    audit_source_id: str  # MEDCAP_AUDIT_SOURCE_ID, else the host name
    ae_title: str  # our DICOM AE title
    host: str  # this machine's name


@cache
def schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMA)))


def validate(document: etree._Element) -> None:
    checker = schema()
    if not checker.validate(document):
        raise InvalidAuditMessage("; ".join(f"line {e.line}: {e.message}" for e in checker.error_log))


def message(s: Session, event: AuditEvent, source: Source) -> bytes:
    """The event's DICOM audit message, schema-checked, as UTF-8 XML on one line."""
    build = BUILDERS.get(Action(event.action))
    if build is None:
        raise KeyError(f"{event.action} has no DICOM audit message")
    document = build(s, event, source)
    validate(document)
    # The declaration on the same line: a syslog MSG is one line.
    return b'<?xml version="1.0" encoding="UTF-8"?>' + bytes(etree.tostring(document, encoding="UTF-8", xml_declaration=False))


# -- the parts of a message --------------------------------------------------------------------


def _text(value: object, limit: int = 1024) -> str:
    return _NOT_XML.sub("\ufffd", str(value))[:limit]


def _root(
    event: AuditEvent, event_id: Code, action: str, outcome: str, type_code: Code | None = None, why: str | None = None
) -> etree._Element:
    root = etree.Element("AuditMessage")
    ident = etree.SubElement(
        root, "EventIdentification", {"EventActionCode": action, "EventDateTime": event.at.isoformat(), "EventOutcomeIndicator": outcome}
    )
    event_id.element(ident, "EventID")
    if type_code is not None:
        type_code.element(ident, "EventTypeCode")
    if why:
        etree.SubElement(ident, "EventOutcomeDescription").text = _text(why)
    return root


def _participant(
    root: etree._Element,
    user_id: str,
    *,
    requestor: bool,
    role: Code | None = None,
    alternative: str | None = None,
    name: str | None = None,
    access_point: str | None = None,
) -> None:
    attributes = {"UserID": _text(user_id, 256) or "unknown", "UserIsRequestor": "true" if requestor else "false"}
    if alternative:
        attributes["AlternativeUserID"] = _text(alternative, 256)
    if name:
        attributes["UserName"] = _text(name, 256)
    if access_point:
        attributes["NetworkAccessPointID"] = _text(access_point, 256)
        attributes["NetworkAccessPointTypeCode"] = "2" if _ADDRESS.search(access_point) else "1"
    element = etree.SubElement(root, "ActiveParticipant", attributes)
    if role is not None:
        role.element(element, "RoleIDCode")


def _ourselves(root: etree._Element, source: Source, *, requestor: bool = False, role: Code | None = APPLICATION) -> None:
    _participant(root, "MedCap", requestor=requestor, role=role, alternative=f"AETITLES={source.ae_title}", access_point=source.host)


def _audit_source(root: etree._Element, source: Source) -> None:
    element = etree.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": _text(source.audit_source_id, 256)})
    etree.SubElement(element, "AuditSourceTypeCode", {"csd-code": "4"})  # application server process


def _object(
    root: etree._Element,
    id_type: Code,
    object_id: str,
    *,
    type_code: str,
    role: str,
    name: str | None = None,
    query: bytes | None = None,
    life_cycle: str | None = None,
) -> etree._Element:
    attributes = {"ParticipantObjectID": _text(object_id, 256) or "unknown", "ParticipantObjectTypeCode": type_code}
    attributes["ParticipantObjectTypeCodeRole"] = role
    if life_cycle:
        attributes["ParticipantObjectDataLifeCycle"] = life_cycle
    element = etree.SubElement(root, "ParticipantObjectIdentification", attributes)
    id_type.element(element, "ParticipantObjectIDTypeCode")
    if query is not None:
        etree.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(query).decode()
    else:
        etree.SubElement(element, "ParticipantObjectName").text = _text(name or object_id, 256)
    return element


@dataclass(frozen=True)
class StudyRef:
    study_uid: str
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None
    sop_classes: tuple[tuple[str, int], ...] = ()  # (SOP Class UID, number of instances)
    instances: tuple[tuple[str, str], ...] = ()  # (SOP Class UID, SOP Instance UID) named one by one


def _studies(root: etree._Element, studies: Iterable[StudyRef], *, life_cycle: str | None = None) -> None:
    """A study object (with its SOP classes and accession) and its patient, per study."""
    patients: dict[str, str | None] = {}
    for study in studies:
        element = _object(root, STUDY_INSTANCE_UID, study.study_uid, type_code="2", role="3", name=study.study_uid, life_cycle=life_cycle)
        if study.accession_number or study.sop_classes or study.instances:
            description = etree.SubElement(element, "ParticipantObjectDescription")
            if study.accession_number:
                etree.SubElement(description, "Accession", {"Number": _text(study.accession_number, 64)})
            for sop_class, count in study.sop_classes:
                etree.SubElement(description, "SOPClass", {"UID": sop_class, "NumberOfInstances": str(count)})
            by_class: dict[str, list[str]] = {}
            for sop_class, uid in study.instances:
                by_class.setdefault(sop_class, []).append(uid)
            for sop_class, uids in by_class.items():
                sop = etree.SubElement(description, "SOPClass", {"UID": sop_class, "NumberOfInstances": str(len(uids))})
                for uid in uids:
                    etree.SubElement(sop, "Instance", {"UID": uid})
        patients.setdefault(study.patient_id or "", study.patient_name)
    for patient_id, patient_name in patients.items():
        if patient_id:
            _object(root, PATIENT_NUMBER, patient_id, type_code="1", role="1", name=patient_name or patient_id)


def _study_by_uid(s: Session, study_uid: str | None) -> list[StudyRef]:
    if not study_uid:
        return []
    row = s.execute(select(Study.accession_number, Study.patient_id, Study.patient_name).where(Study.study_uid == study_uid)).first()
    return [StudyRef(study_uid, row.accession_number, row.patient_id, row.patient_name)] if row else [StudyRef(study_uid, None, None, None)]


@dataclass(frozen=True)
class Actor:
    """An audit event's actor string (service.audit's ``kind:name``), taken apart."""

    kind: str
    name: str
    address: str | None

    @classmethod
    def parse(cls, actor: str, address: str | None = None) -> Actor:
        kind, _, name = actor.partition(":")
        if kind == "dicom":  # dicom:AE@address
            ae, _, at = name.rpartition("@")
            return cls(kind, ae, at or address)
        if kind == "web" and not address:  # web:address, before we know who it is
            return cls(kind, name, name)
        return cls(kind, name, address)


# -- one builder per action ------------------------------------------------------------------


def _application(s: Session, event: AuditEvent, source: Source) -> etree._Element:
    started = event.action == Action.LISTENER_STARTED.value
    root = _root(event, APPLICATION_ACTIVITY, "E", SUCCESS, APPLICATION_START if started else APPLICATION_STOP)
    _ourselves(root, source)
    actor = Actor.parse(event.actor)
    if actor.kind in ("cli", "user"):
        _participant(root, actor.name, requestor=True, role=APPLICATION_LAUNCHER)
    _audit_source(root, source)
    return root


def _association_rejected(s: Session, event: AuditEvent, source: Source) -> etree._Element:
    reason = str(event.details.get("reason") or "association refused")
    root = _root(event, SECURITY_ALERT, "E", MINOR_FAILURE, NODE_AUTHENTICATION, why=reason)
    peer = Actor.parse(event.actor)
    _participant(root, f"{peer.name}@{peer.address}", requestor=True, alternative=f"AETITLES={peer.name}", access_point=peer.address)
    _ourselves(root, source)
    _audit_source(root, source)
    _object(root, NODE_ID, peer.address or "unknown", type_code="2", role="13", name=f"calling AE {peer.name}")
    return root


def _received(s: Session, event: AuditEvent, source: Source) -> etree._Element:
    failed = int(event.details.get("failed") or 0)
    root = _root(
        event, INSTANCES_TRANSFERRED, "C", MINOR_FAILURE if failed else SUCCESS, why=f"{failed} instances refused" if failed else None
    )
    peer = Actor.parse(event.actor)
    _participant(
        root, f"{peer.name}@{peer.address}", requestor=True, role=SOURCE, alternative=f"AETITLES={peer.name}", access_point=peer.address
    )
    _ourselves(root, source, role=DESTINATION)
    _audit_source(root, source)
    rows = s.execute(
        select(Study.study_uid, Study.accession_number, Study.patient_id, Study.patient_name, Instance.sop_class_uid, func.count())
        .join(Study, Study.id == Instance.study_id)
        .where(Instance.association_id == int(event.object_id))
        .group_by(Study.study_uid, Study.accession_number, Study.patient_id, Study.patient_name, Instance.sop_class_uid)
        .order_by(Study.study_uid, Instance.sop_class_uid)
    ).all()
    studies: dict[str, StudyRef] = {}
    for row in rows:
        known = studies.get(row[0])
        classes = (known.sop_classes if known else ()) + ((row[4], int(row[5])),)
        studies[row[0]] = StudyRef(row[0], row[1], row[2], row[3], classes)
    _studies(root, studies.values(), life_cycle="2")  # import / copy
    return root


def _sent(s: Session, event: AuditEvent, source: Source) -> etree._Element:
    root = _root(event, INSTANCES_TRANSFERRED, "R", SUCCESS)
    row = s.execute(
        select(Dispatch.destination, SRDocument.sop_instance_uid, SRDocument.study_id)
        .join(Output, Output.id == Dispatch.output_id)
        .join(SRDocument, SRDocument.id == Output.report_id)
        .where(Dispatch.id == int(event.object_id))
    ).first()
    _ourselves(root, source, requestor=True, role=SOURCE)
    destination = str(row.destination) if row else "unknown"
    ae, _, where = destination.partition("@")
    _participant(
        root, destination, requestor=False, role=DESTINATION, alternative=f"AETITLES={ae}", access_point=where.rsplit(":", 1)[0] or None
    )
    _audit_source(root, source)
    if row is not None:
        study = s.execute(select(Study).where(Study.id == row.study_id)).scalar_one()
        _studies(root, [StudyRef(study.study_uid, study.accession_number, study.patient_id, study.patient_name)])
    return root


def _user(root: etree._Element, event: AuditEvent) -> None:
    """The signed-in (or signing-in) user who did it, from where."""
    address = event.details.get("address")
    actor = Actor.parse(event.actor, str(address) if address else None)
    user = actor.name if actor.kind in ("user", "cli") else f"unauthenticated@{actor.address}"
    _participant(root, user, requestor=True, access_point=actor.address)


def _accessed(s: Session, event: AuditEvent, source: Source) -> etree._Element:
    """The review page: the draft SR and the key images it shows, each named by its SOP Instance UID."""
    root = _root(event, INSTANCES_ACCESSED, "R", SUCCESS)
    _user(root, event)
    _ourselves(root, source)
    _audit_source(root, source)
    studies = _study_by_uid(s, event.study_uid)
    draft_id = event.details.get("draft_id")
    if studies and draft_id is not None:
        shown = [
            str(image["sop_instance_uid"])
            for images in s.scalars(select(Draft.key_images).where(Draft.sr_document_id == int(draft_id)))
            for image in images
        ]
        sr = s.execute(select(SRDocument.sop_instance_uid).where(SRDocument.id == int(draft_id))).scalar()
        found = s.execute(select(Instance.sop_instance_uid, Instance.sop_class_uid).where(Instance.sop_instance_uid.in_(shown)))
        classes = {uid: sop_class for uid, sop_class in found}
        instances: tuple[tuple[str, str], ...] = ((COMPREHENSIVE_SR, sr),) if sr else ()
        instances += tuple((classes[uid], uid) for uid in dict.fromkeys(shown) if uid in classes)
        studies = [replace(studies[0], instances=instances)]
    _studies(root, studies, life_cycle="6")  # access / use
    return root


def _exported(s: Session, event: AuditEvent, source: Source) -> etree._Element:
    root = _root(event, EXPORT, "R", SUCCESS)
    _user(root, event)
    _ourselves(root, source, role=SOURCE)
    if event.action == Action.FEEDBACK_EXPORTED.value:
        where = str(event.details.get("out") or event.object_id)
        _participant(root, where, requestor=False, role=DESTINATION_MEDIA, name="de-identified training table")
        _audit_source(root, source)
        return root
    via = "command line" if event.details.get("via") == "cli" else "web download"
    _participant(root, f"CSV ({via})", requestor=False, role=DESTINATION_MEDIA)
    _audit_source(root, source)
    _object(root, URI, AUDIT_TRAIL_URI, type_code="2", role="13", query=_filters(event), life_cycle="10")  # export
    return root


def _query(s: Session, event: AuditEvent, source: Source) -> etree._Element:
    root = _root(event, QUERY, "E", SUCCESS)
    _user(root, event)
    _ourselves(root, source)
    _audit_source(root, source)
    _object(root, URI, AUDIT_TRAIL_URI, type_code="2", role="24", query=_filters(event))
    return root


def _filters(event: AuditEvent) -> bytes:
    return json.dumps(event.details.get("filters") or {}, sort_keys=True).encode()


def _authentication(s: Session, event: AuditEvent, source: Source) -> etree._Element:
    action = Action(event.action)
    outcome = SUCCESS if action in (Action.LOGIN_SUCCEEDED, Action.LOGOUT) else MINOR_FAILURE
    why = {Action.LOGIN_FAILED: "wrong user name or password", Action.LOGIN_THROTTLED: "too many failed sign-ins"}.get(action)
    root = _root(event, USER_AUTHENTICATION, "E", outcome, LOGOUT if action is Action.LOGOUT else LOGIN, why=why)
    address = event.details.get("address")
    _participant(root, event.object_id, requestor=True, access_point=str(address) if address else None)
    _ourselves(root, source)
    _audit_source(root, source)
    return root


BUILDERS: dict[Action, Callable[[Session, AuditEvent, Source], etree._Element]] = {
    Action.LISTENER_STARTED: _application,
    Action.LISTENER_STOPPED: _application,
    Action.ASSOCIATION_REJECTED: _association_rejected,
    Action.ASSOCIATION_ENDED: _received,
    Action.DISPATCH_DELIVERED: _sent,
    Action.STUDY_VIEWED: _accessed,
    Action.FEEDBACK_EXPORTED: _exported,
    Action.AUDIT_EXPORTED: _exported,
    Action.AUDIT_SEARCHED: _query,
    Action.LOGIN_SUCCEEDED: _authentication,
    Action.LOGIN_FAILED: _authentication,
    Action.LOGIN_THROTTLED: _authentication,
    Action.LOGOUT: _authentication,
}
