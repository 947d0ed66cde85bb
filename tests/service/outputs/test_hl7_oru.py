"""The ORU^R01 kind: messages built from real draft and verified SRs, sent over MLLP to hl7apy's own MLLP
server (a RIS that acknowledges, refuses or is down), through the dispatch lifecycle and runner."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from hl7apy.parser import parse_message
from sqlalchemy import select

from service.outputs import Hl7Oru
from service.outputs.hl7_oru import Applications, MllpPeer, control_id, escape, exchange, judge, oru_r01, text_lines
from service.outputs.report_facts import ResultStatus
from service.schema import Output, SRDocument
from tests.service.outputs.conftest import attempt_items, dispatch, facts, history, sender
from tests.service.outputs.mllp_ris import Ris


@pytest.fixture
def ris() -> Iterator[Ris]:
    server = Ris()
    yield server
    server.stop()


def kind(settings) -> Hl7Oru:
    return Hl7Oru(Applications("MEDCAP", "RADIOLOGY", "RIS", "HOSPITAL"), storage=settings.storage, timeout=5)


def segments(er7: str, name: str) -> list[list[str]]:
    return [seg.split("|") for seg in er7.replace("\n", "\r").split("\r") if seg.startswith(name + "|")]


# -- without a peer ---------------------------------------------------------------------------------


def test_the_message_names_order_patient_study_and_each_series_text():
    data = oru_r01(facts(ResultStatus.FINAL, "Smith^Jane"), Applications(), "m1", datetime(2026, 1, 2, 11, 5, tzinfo=UTC))
    er7 = data.decode("utf-8")
    assert segments(er7, "MSH")[0][17] == "UNICODE UTF-8", "non-ASCII text declares its encoding (MSH-18)"
    message = parse_message(er7.strip("\r"), find_groups=False)
    assert message.pid.pid_3.value == "P-77^^^^PI" and message.pid.pid_5.to_er7() == "Müller^Anna^B^^Dr"
    assert message.pid.pid_7.value == "19700501" and message.pid.pid_8.value == "F"
    (orc,), (obr,) = segments(er7, "ORC"), segments(er7, "OBR")
    assert orc[2] == obr[2] == obr[3] == obr[18] == "ACC\\F\\42", "the accession number, escaped"
    assert (obr[7], obr[25], obr[32]) == ("20260102", "F", "&Smith&Jane")
    obx = segments(er7, "OBX")
    assert [(o[2], o[3].split("^")[0], o[4]) for o in obx] == [
        ("HD", "113014", ""),
        ("HD", "112002", "1"),
        ("TX", "18782-3", "1"),
        ("HD", "112002", "2"),
        ("TX", "18782-3", "2"),
        ("TX", "19005-8", ""),
    ]
    assert [o[5] for o in obx] == [
        "1.2.3.4",
        "1.2.3.4.1",
        "No bleed.~Ventricles normal \\F\\ symmetric.",
        "1.2.3.4.2",
        "T1 \\T\\ T2 \\S\\ fine",
        "Normal.",
    ]
    preliminary = oru_r01(facts(ResultStatus.PRELIMINARY, None), Applications(), "m0", datetime(2026, 1, 2, 10, 5, tzinfo=UTC)).decode()
    assert segments(preliminary, "OBR")[0][25] == "P" and {o[11] for o in segments(preliminary, "OBX")} == {"P"}
    with pytest.raises(ValueError, match="verifier_name"):
        facts(ResultStatus.PRELIMINARY, "Smith^Jane")


def test_text_is_escaped_and_lines_are_repetitions():
    text = "a|b^c&d~e\\f\nsecond line"
    assert escape(text) == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f second line"
    assert text_lines(text) == ["a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f", "second line"] and text_lines("") == ['""']
    assert "\r" not in escape("one\r\ntwo") and "|" not in escape("|||")


@pytest.mark.parametrize(
    ("code", "delivered", "retryable", "summary"),
    [
        ("AA", True, False, "ACK AA"),
        ("CA", True, False, "ACK CA"),
        ("AR", False, True, "rejected by the receiver (NAK AR): busy"),
        ("AE", False, False, "refused by the receiver (NAK AE): busy"),
        ("ZZ", False, True, "unknown acknowledgment code 'ZZ'"),
    ],
)
def test_each_acknowledgment_code_has_its_outcome(code, delivered, retryable, summary):
    ack = f"MSH|^~\\&|RIS|H|MEDCAP|R|20260101000000||ACK^R01^ACK|1|P|2.5.1\rMSA|{code}|msg1|busy\r".encode()
    delivery = judge(b"\x0b" + ack + b"\x1c\r", "msg1")
    assert (delivery.delivered, delivery.retryable) == (delivered, retryable)
    assert delivery.summary.startswith(summary)
    assert delivery.items[0]["ack_code"] == code and delivery.items[0]["acknowledged_control_id"] == "msg1"


def test_an_ack_of_another_message_or_garbage_is_retried():
    ack = b"MSH|^~\\&|RIS|H|||20260101000000||ACK^R01^ACK|1|P|2.5.1\rMSA|AA|someone-else\r"
    wrong = judge(ack, "msg1")
    assert (wrong.delivered, wrong.retryable) == (False, True) and "acknowledges message 'someone-else'" in wrong.summary
    garbage = judge(b"HTTP/1.1 400 Bad Request\r\n", "msg1")
    assert (garbage.delivered, garbage.retryable) == (False, True) and "not an HL7 ACK" in garbage.summary


def test_destinations_are_parsed():
    assert MllpPeer.parse("mllp://127.0.0.1:2575") == MllpPeer("127.0.0.1", 2575, False)
    assert MllpPeer.parse("mllps://[::1]:6661") == MllpPeer("::1", 6661, True)
    for bad in ("mllp://host", "http://h:1", "mllp://h:99999", "AE@h:104"):
        assert not Hl7Oru().accepts(bad)
        with pytest.raises(ValueError):
            MllpPeer.parse(bad)


def test_a_peer_that_closes_without_an_ack_is_a_connection_error():
    import socket

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        port = listening.getsockname()[1]

        def close_at_once() -> None:
            conn, _ = listening.accept()
            conn.recv(65536)
            conn.close()

        threading.Thread(target=close_at_once, daemon=True).start()
        with pytest.raises(ConnectionError, match="without an ACK"):
            exchange(MllpPeer("127.0.0.1", port, False), b"MSH|x\r", 5, None)


# -- with real reports and hl7apy's MLLP server ---------------------------------------------------------


@pytest.mark.peers
def test_draft_then_verified_report_reach_the_ris_as_p_then_f(db, clock, settings, draft_id, approve, ris):
    ris.start()
    hl7 = kind(settings)
    first = dispatch(db, clock, draft_id, ris.destination, hl7)
    assert sender(db, clock, hl7).run(first) == "delivered"
    verified_id = approve(draft_id)
    second = dispatch(db, clock, verified_id, ris.destination, hl7)
    assert sender(db, clock, hl7).run(second) == "delivered"

    with db.session() as s:
        draft, verified = s.get(SRDocument, draft_id), s.get(SRDocument, verified_id)
        stored = {o.report_id: o for o in s.scalars(select(Output).where(Output.kind == "hl7-oru"))}
    assert len(ris.received) == 2
    p, f = ris.received
    assert p.encode() == settings.storage.read_bytes(stored[draft_id].path), "the RIS got the stored artefact"
    for er7, status, report in ((p, "P", draft), (f, "F", verified)):
        message = parse_message(er7, find_groups=False)
        assert message.msh.msh_9.value == "ORU^R01^ORU_R01" and message.msh.msh_12.value == "2.5.1"
        assert message.msh.msh_10.value == control_id(report.sop_instance_uid)
        assert message.msh.msh_5.value == "RIS" and message.msh.msh_4.value == "RADIOLOGY"
        (obr,) = segments(er7, "OBR")
        assert obr[25] == status
        obx = segments(er7, "OBX")
        assert {o[11] for o in obx} == {status}
        assert [o[5] for o in obx if o[3].startswith("113014^")] == [report_study_uid(db, report)]
        texts = [o for o in obx if o[3].startswith("18782-3^")]
        series = [o for o in obx if o[3].startswith("112002^")]
        assert len(texts) == len(series) >= 1 and [o[4] for o in texts] == [o[4] for o in series]
        assert all(o[5] for o in texts) and all(o[18].startswith("2.25.") for o in texts), "text per series, from the model"
    # the same order both times, so the RIS files the final report over the preliminary one
    assert segments(p, "OBR")[0][2:4] == segments(f, "OBR")[0][2:4]
    assert segments(p, "PID")[0][3] == segments(f, "PID")[0][3] and segments(p, "PID")[0][5] == segments(f, "PID")[0][5]
    assert len(segments(p, "OBR")[0]) < 33 and segments(f, "OBR")[0][32] == "&Smith&Jane", "the interpreter only once verified"
    assert all(o[16] == "^Smith^Jane" for o in segments(f, "OBX"))
    assert history(db, second)[0] == ("delivered", 1, None)
    assert attempt_items(db, second) == [
        [{"ack_code": "AA", "acknowledged_control_id": control_id(verified.sop_instance_uid), "text": "", "errors": []}]
    ]
    assert history(db, first)[2] == ["dispatch.queued", "dispatch.delivered"]


def report_study_uid(db, report: SRDocument) -> str:
    from service.schema import Study

    with db.session() as s:
        return str(s.scalar(select(Study.study_uid).where(Study.id == report.study_id)))


@pytest.mark.peers
def test_a_busy_ris_is_retried_then_the_dispatch_fails(db, clock, settings, draft_id, ris):
    ris.code = "AR"
    ris.start()
    hl7 = kind(settings)
    dispatch_id = dispatch(db, clock, draft_id, ris.destination, hl7)
    assert sender(db, clock, hl7).run(dispatch_id) == "retrying"
    clock.advance(11)
    assert sender(db, clock, hl7).run(dispatch_id) == "retrying"
    clock.advance(11)
    assert sender(db, clock, hl7).run(dispatch_id) == "failed"
    (status, attempts, error), outcomes, events = history(db, dispatch_id)
    assert (status, attempts) == ("failed", 3) and error.startswith("gave up after 3 attempts: rejected by the receiver (NAK AR)")
    assert [o for o, _ in outcomes] == ["transient"] * 3 and len(ris.received) == 3
    assert events == ["dispatch.queued", "dispatch.retry_scheduled", "dispatch.retry_scheduled", "dispatch.failed"]
    assert len({parse_message(m, find_groups=False).msh.msh_10.value for m in ris.received}) == 1, "one control id for every attempt"


@pytest.mark.peers
def test_an_application_error_fails_at_once_and_a_ris_that_is_down_is_retried_until_it_is_up(db, clock, settings, draft_id, approve, ris):
    hl7 = kind(settings)
    dispatch_id = dispatch(db, clock, draft_id, ris.destination, hl7)
    assert sender(db, clock, hl7).run(dispatch_id) == "retrying"  # nothing listens yet
    assert "ConnectionRefusedError" in history(db, dispatch_id)[1][0][1]
    ris.start()
    clock.advance(11)
    assert sender(db, clock, hl7).run(dispatch_id) == "delivered"
    assert [o for o, _ in history(db, dispatch_id)[1]] == ["transient", "delivered"]

    ris.code = "AE"
    verified = dispatch(db, clock, approve(draft_id), ris.destination, hl7)
    assert sender(db, clock, hl7).run(verified) == "failed"
    (status, attempts, error), outcomes, _ = history(db, verified)
    assert (status, attempts, error) == ("failed", 1, "refused by the receiver (NAK AE): order not on file")
    assert outcomes == [("refused", "refused by the receiver (NAK AE): order not on file")]


@pytest.mark.peers
def test_a_second_verified_report_of_a_study_is_a_correction(db, clock, settings, draft_id, approve):
    verified_id = approve(draft_id)
    with db.session() as s:
        first = s.get(SRDocument, verified_id)
        # a later version's verified report of the same study (same file: only the status is under test)
        again = SRDocument(
            **{
                c: getattr(first, c) for c in ("kind", "study_id", "study_version_id", "series_uid", "completion_flag", "verification_flag")
            },
            idempotency_key="verified:again",
            sop_instance_uid="2.25.99",
            path=first.path,
            sha256=first.sha256,
            created_at=datetime.now(UTC),
            created_by="user:smith",
        )
        s.add(again)
        s.flush()
        message = settings.storage.read_bytes(kind(settings).build(again).path).decode()
        earlier = settings.storage.read_bytes(kind(settings).build(first).path).decode()
    assert segments(message, "OBR")[0][25] == "C" and {o[11] for o in segments(message, "OBX")} == {"C"}
    assert segments(earlier, "OBR")[0][25] == "F"


def test_an_artefact_that_is_missing_or_not_hl7_is_a_refusal(tmp_path):
    from service.outputs import Artefact
    from service.storage import Storage

    storage = Storage(tmp_path)
    hl7 = Hl7Oru(storage=storage)
    missing = hl7.send(Artefact(tmp_path / "gone.hl7", Hl7Oru.media_type, "0" * 64), "mllp://127.0.0.1:9")
    assert (missing.delivered, missing.retryable) == (False, False) and "missing" in missing.summary
    stored = storage.write_output("1.2.3", "1.2.3.4", "hl7", b"\xff\xfe not a message")
    garbled = hl7.send(Artefact(stored.path, Hl7Oru.media_type, stored.sha256), "mllp://127.0.0.1:9")
    assert (garbled.delivered, garbled.retryable) == (False, False) and garbled.summary.startswith("cannot send")
