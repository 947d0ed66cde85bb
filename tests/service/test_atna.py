"""DICOM audit messages (PS3.15 A.5): one per copied audit event, each valid against the standard's schema."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import rnc2rng
from lxml import etree
from sqlalchemy import select

from service import atna, audit
from service.audit import ATNA_ACTIONS, Action
from service.schema import AuditEvent, Dispatch, Draft, Instance, SeriesRecord, SRDocument, Study
from tests.migrations.audit_data import populate

SOURCE = atna.Source("MEDCAP-TEST", "MEDCAP", "medcap.example")
AT = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)


def test_the_vendored_rng_is_the_standards_rnc_converted():
    # '##' (annotation) comments after a value are plain comments to rnc2rng's grammar, as the RNC header says.
    text = (atna.SCHEMA.with_suffix(".rnc")).read_text().replace("##", "#")
    converted = etree.fromstring(rnc2rng.dumps(rnc2rng.loads(text)).encode())
    vendored = etree.parse(str(atna.SCHEMA)).getroot()
    assert etree.tostring(converted, method="c14n") == etree.tostring(vendored, method="c14n")


def record(db, action: Action, object_type: str, object_id: str | int, actor: str = "user:smith", **kw) -> AuditEvent:
    with db.session() as s:
        event = audit.record(s, AT, actor, action, object_type, object_id, **kw)
        s.flush()
        event_id = event.id
    with db.session() as s:
        return s.get(AuditEvent, event_id)


def render(db, event):
    with db.session() as s:
        xml = atna.message(s, event, SOURCE)
    assert xml.startswith(b"<?xml") and b"\n" not in xml.split(b"?>", 1)[1], "one line: a syslog MSG"
    document = etree.fromstring(xml)
    atna.validate(document)  # message() checked it; checked again here on what left
    return document


def event_id(doc):
    ident = doc.find("EventIdentification")
    type_code = ident.find("EventTypeCode")
    return (
        ident.find("EventID").get("csd-code"),
        type_code.get("csd-code") if type_code is not None else None,
        ident.get("EventActionCode"),
        ident.get("EventOutcomeIndicator"),
    )


def objects(doc):
    return {
        o.find("ParticipantObjectIDTypeCode").get("csd-code"): o.get("ParticipantObjectID")
        for o in doc.iter("ParticipantObjectIdentification")
    }


def test_every_copied_action_has_a_message_builder():
    assert set(atna.BUILDERS) == set(ATNA_ACTIONS)


def test_application_start_and_stop(db):
    started = render(db, record(db, Action.LISTENER_STARTED, "listener", "host:11112", actor="cli:root"))
    assert event_id(started) == ("110100", "110120", "E", "0")
    roles = {p.get("UserID"): p.find("RoleIDCode").get("csd-code") for p in started.iter("ActiveParticipant")}
    assert roles == {"MedCap": "110150", "root": "110151"}
    assert started.find("AuditSourceIdentification").get("AuditSourceID") == "MEDCAP-TEST"
    assert event_id(render(db, record(db, Action.LISTENER_STOPPED, "listener", "host:11112", actor="system:listener")))[:2] == (
        "110100",
        "110121",
    )


def test_a_refused_association_is_a_security_alert(db):
    doc = render(
        db, record(db, Action.ASSOCIATION_REJECTED, "association", 7, actor="dicom:EVIL@10.6.6.6", reason="calling AE not allowed")
    )
    assert event_id(doc) == ("110113", "110126", "E", "4")
    assert doc.find("EventIdentification/EventOutcomeDescription").text == "calling AE not allowed"
    peer = doc.find("ActiveParticipant")
    assert (peer.get("NetworkAccessPointID"), peer.get("NetworkAccessPointTypeCode"), peer.get("UserIsRequestor")) == (
        "10.6.6.6",
        "2",
        "true",
    )
    assert objects(doc) == {"110182": "10.6.6.6"}


def test_instances_received_name_each_study_its_sop_classes_and_patient(db):
    ids = populate(db)
    with db.session() as s:
        study = s.scalars(select(Study).order_by(Study.id)).first()
        from service.schema import Association

        assoc = Association(
            calling_ae="CT1", called_ae="MEDCAP", peer_address="10.0.0.5", peer_port=1000, tls=False, started_at=AT, ended_at=AT,
            listener="l", outcome="released", instances_received=3, instances_duplicate=0, instances_failed=0,
        )  # fmt: skip
        s.add(assoc)
        series = SeriesRecord(study_id=study.id, series_uid=study.study_uid + ".5", modality="CT")
        s.add(series)
        s.flush()
        for n, sop_class in enumerate(["1.2.840.10008.5.1.4.1.1.2"] * 2 + ["1.2.840.10008.5.1.4.1.1.7"]):
            s.add(
                Instance(
                    sop_instance_uid=f"{study.study_uid}.5.{n}", sop_class_uid=sop_class, transfer_syntax_uid="1.2.840.10008.1.2.1",
                    study_id=study.id, series_id=series.id,
                    association_id=assoc.id, path=f"/x/{n}", sha256="0" * 64, size=1, received_at=AT, captionable=True,
                )
            )  # fmt: skip
        assoc_id, study_uid, patient_id, accession = assoc.id, study.study_uid, study.patient_id, study.accession_number
    doc = render(db, record(db, Action.ASSOCIATION_ENDED, "association", assoc_id, actor="dicom:CT1@10.0.0.5", received=3, failed=0))
    assert event_id(doc) == ("110104", None, "C", "0")
    roles = [(p.get("UserID"), p.find("RoleIDCode").get("csd-code")) for p in doc.iter("ActiveParticipant")]
    assert roles == [("CT1@10.0.0.5", "110153"), ("MedCap", "110152")]
    assert objects(doc) == {"110180": study_uid, "2": patient_id}
    classes = {c.get("UID"): c.get("NumberOfInstances") for c in doc.iter("SOPClass")}
    assert classes == {"1.2.840.10008.5.1.4.1.1.2": "2", "1.2.840.10008.5.1.4.1.1.7": "1"}
    assert doc.find(".//Accession").get("Number") == accession
    assert ids


def test_a_delivered_sr_is_instances_sent(db):
    ids = populate(db)
    with db.session() as s:
        dispatch = s.get(Dispatch, ids["failed_dispatch"])
        destination = dispatch.destination
    doc = render(db, record(db, Action.DISPATCH_DELIVERED, "dispatch", ids["failed_dispatch"], actor="worker:w1"))
    assert event_id(doc) == ("110104", None, "R", "0")
    roles = [(p.get("UserID"), p.find("RoleIDCode").get("csd-code"), p.get("UserIsRequestor")) for p in doc.iter("ActiveParticipant")]
    assert roles == [("MedCap", "110153", "true"), (destination, "110152", "false")]
    assert set(objects(doc)) == {"110180", "2"}


def test_a_review_page_view_is_instances_accessed(db):
    populate(db)
    with db.session() as s:
        study = s.scalars(select(Study).order_by(Study.id)).first()
    doc = render(db, record(db, Action.STUDY_VIEWED, "sr_document", "1.2.3", study_uid=study.study_uid, address="192.0.2.7", draft_id=1))
    assert event_id(doc) == ("110103", None, "R", "0")
    user = doc.find("ActiveParticipant")
    assert (user.get("UserID"), user.get("NetworkAccessPointID"), user.get("UserIsRequestor")) == ("smith", "192.0.2.7", "true")
    assert objects(doc) == {"110180": study.study_uid, "2": study.patient_id}


@pytest.mark.peers
def test_the_review_page_names_the_draft_and_its_key_images(db, draft_id):
    with db.session() as s:
        sr_uid, study_uid = s.execute(
            select(SRDocument.sop_instance_uid, Study.study_uid)
            .join(Study, Study.id == SRDocument.study_id)
            .where(SRDocument.id == draft_id)
        ).one()
        key_images = [
            image["sop_instance_uid"] for d in s.scalars(select(Draft).where(Draft.sr_document_id == draft_id)) for image in d.key_images
        ]
    assert len(key_images) == 3
    doc = render(db, record(db, Action.STUDY_VIEWED, "sr_document", sr_uid, study_uid=study_uid, address="192.0.2.7", draft_id=draft_id))
    named = {i.get("UID"): i.getparent().get("UID") for i in doc.iter("Instance")}
    assert named.keys() == {sr_uid, *key_images}
    assert named[sr_uid] == atna.COMPREHENSIVE_SR and {named[k] for k in key_images} == {"1.2.840.10008.5.1.4.1.1.2"}


def test_exports_and_queries(db):
    filters = {"patient": "doe jane", "action": "draft."}
    exported = render(db, record(db, Action.AUDIT_EXPORTED, "audit", "events", filters=filters, rows=3, address="192.0.2.7"))
    assert event_id(exported) == ("110106", None, "R", "0")
    media = [
        p
        for p in exported.iter("ActiveParticipant")
        if p.find("RoleIDCode") is not None and p.find("RoleIDCode").get("csd-code") == "110154"
    ]
    assert media and media[0].get("UserID") == "CSV (web download)"
    searched = render(db, record(db, Action.AUDIT_SEARCHED, "audit", "events", actor="cli:root", filters=filters, via="cli"))
    assert event_id(searched) == ("110112", None, "E", "0")
    query = searched.find("ParticipantObjectIdentification/ParticipantObjectQuery").text
    import base64
    import json

    assert json.loads(base64.b64decode(query)) == filters
    feedback = render(db, record(db, Action.FEEDBACK_EXPORTED, "feedback_export", "/out/table.csv", actor="cli:root", out="/out", images=3))
    assert event_id(feedback) == ("110106", None, "R", "0")


@pytest.mark.parametrize(
    ("action", "type_code", "outcome"),
    [
        (Action.LOGIN_SUCCEEDED, "110122", "0"),
        (Action.LOGIN_FAILED, "110122", "4"),
        (Action.LOGIN_THROTTLED, "110122", "4"),
        (Action.LOGOUT, "110123", "0"),
    ],
)
def test_user_authentication(db, action, type_code, outcome):
    doc = render(db, record(db, action, "user", "smith", actor="web:192.0.2.7", address="192.0.2.7"))
    assert event_id(doc) == ("110114", type_code, "E", outcome)
    user = doc.find("ActiveParticipant")
    assert (user.get("UserID"), user.get("NetworkAccessPointID")) == ("smith", "192.0.2.7")


def test_what_a_stranger_typed_stays_text_in_a_valid_message(db):
    hostile = 'x"/><Evil a="\x07\x1b]]>&amp;'
    doc = render(db, record(db, Action.LOGIN_FAILED, "user", hostile[:128], actor="web:192.0.2.9", address="192.0.2.9"))
    assert doc.find("ActiveParticipant").get("UserID").startswith('x"/><Evil a="') and doc.find(".//Evil") is None


def test_the_schema_refuses_a_message_without_its_audit_source(db):
    doc = render(db, record(db, Action.LOGOUT, "user", "smith", address="192.0.2.7"))
    doc.remove(doc.find("AuditSourceIdentification"))
    with pytest.raises(atna.InvalidAuditMessage, match="AuditSourceIdentification|Expecting"):
        atna.validate(doc)
    assert AT + timedelta(0) == AT
