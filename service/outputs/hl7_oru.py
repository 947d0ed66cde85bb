"""The report to the RIS as an HL7 v2.5.1 ORU^R01 over MLLP: ``mllp://host:port`` (``mllps://`` for TLS).

The message (built with hl7apy, validated against the 2.5.1 structure before it is stored) carries
the patient (PID), the order by its accession number (ORC-2/OBR-2/OBR-3: the RIS matches the draft
and the verified report to one order), the result status in OBR-25 and every OBX-11 (P a draft,
F verified, C a correction), the Study Instance UID (OBX HD ``113014^DICOM Study^DCM``), and per
captioned series its Series Instance UID and text, then the impression. The model is OBX-18 (the
equipment); the approving radiologist OBR-32 and OBX-16.

One attempt: one TCP connection, the framed message, the framed ACK. AA (or CA) is delivered; AR/CR
(rejected for reasons unrelated to content: the receiver is busy or down) is retried; AE/CE (an
error in the message) is a refusal; no answer, a garbled one or one acknowledging another message
is retried. Each answer is the attempt's item (code, text, the ACK's control id).
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from dataclasses import dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

from service.outputs import report_facts
from service.outputs.kind import Artefact, Delivery, OutputKind
from service.outputs.report_facts import ReportFacts
from service.schema import SRDocument
from service.storage import Storage, StorageError

if TYPE_CHECKING:
    from service.settings import Settings

START, END = b"\x0b", b"\x1c\r"  # MLLP framing
FINDINGS_CODE = "18782-3^Radiology Study observation (narrative)^LN"
IMPRESSION_CODE = "19005-8^Radiology Imaging study [Impression] (narrative)^LN"
STUDY_CODE = "113014^DICOM Study^DCM"
SERIES_CODE = "112002^Series Instance UID^DCM"
REPORT_CODE = "18748-4^Diagnostic imaging study^LN"
MAX_ACK_BYTES = 1 << 20


@dataclass(frozen=True)
class Applications:
    """MSH-3..6: who sends, who receives."""

    sending_application: str = "MEDCAP"
    sending_facility: str = "MEDCAP"
    receiving_application: str = ""
    receiving_facility: str = ""


@dataclass(frozen=True)
class MllpPeer:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, destination: str) -> MllpPeer:
        scheme, sep, rest = destination.partition("://")
        if not sep or scheme not in ("mllp", "mllps"):
            raise ValueError(f"{destination!r} is not an mllp:// or mllps:// destination")
        host, colon, port = rest.rstrip("/").rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{destination!r} needs host:port")
        return cls(host.strip("[]"), int(port), scheme == "mllps")


class Hl7Oru(OutputKind):
    name = "hl7-oru"
    media_type = "x-application/hl7-v2+er7"

    def __init__(
        self,
        applications: Applications | None = None,
        *,
        storage: Storage | None = None,
        timeout: float = 30.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.applications = applications or Applications()
        self.storage = storage or Storage("medcap-data")
        self.timeout = timeout
        self.tls = tls  # for mllps:// (default: the system's CAs)

    @classmethod
    def from_settings(cls, settings: Settings) -> Hl7Oru:
        tls = ssl.create_default_context(cafile=str(settings.output_tls_ca_file) if settings.output_tls_ca_file else None)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        if settings.output_tls_cert_file and settings.output_tls_key_file:
            tls.load_cert_chain(str(settings.output_tls_cert_file), str(settings.output_tls_key_file))
        applications = Applications(
            settings.hl7_sending_application,
            settings.hl7_sending_facility,
            settings.hl7_receiving_application,
            settings.hl7_receiving_facility,
        )
        return cls(applications, storage=settings.storage, timeout=settings.dispatch_timeout_seconds, tls=tls)

    def accepts(self, destination: str) -> bool:
        try:
            MllpPeer.parse(destination)
        except ValueError:
            return False
        return True

    def build(self, report: SRDocument) -> Artefact:
        facts = report_facts.read(self.storage, report)
        message = oru_r01(facts, self.applications, control_id(report.sop_instance_uid), report.created_at)
        stored = self.storage.write_output(facts.study_uid, report.sop_instance_uid, "hl7", message)
        return Artefact(stored.path, self.media_type, stored.sha256)

    def send(self, artefact: Artefact, destination: str) -> Delivery:
        try:
            peer = MllpPeer.parse(destination)
            message = self.storage.read_bytes(artefact.path)
            sent_id = str(parse_message(message.decode("utf-8").strip("\r"), find_groups=False).msh.msh_10.value)
        except (ValueError, StorageError, OSError, HL7apyException) as exc:  # UnicodeDecodeError is a ValueError
            return Delivery(delivered=False, retryable=False, summary=f"cannot send {artefact.path} to {destination}: {exc}")
        try:
            answer = exchange(peer, message, self.timeout, self.tls)
        except ssl.SSLError as exc:
            return Delivery(delivered=False, retryable=False, summary=f"TLS with {peer.host}:{peer.port} failed: {exc}")
        except OSError as exc:  # refused, reset, timed out, closed before the ACK
            return Delivery(delivered=False, retryable=True, summary=f"MLLP {peer.host}:{peer.port}: {type(exc).__name__}: {exc}")
        return judge(answer, sent_id)


def control_id(sop_instance_uid: str) -> str:
    """MSH-10 (at most 20 characters): the same for every attempt of one report, so a receiver can drop a repeat."""
    return hashlib.sha256(sop_instance_uid.encode("ascii")).hexdigest()[:20]


def exchange(peer: MllpPeer, message: bytes, timeout: float, tls: ssl.SSLContext | None) -> bytes:
    """Send one framed message and read one framed answer."""
    with socket.create_connection((peer.host, peer.port), timeout=timeout) as raw:
        sock: socket.socket = raw
        if peer.tls:
            sock = (tls or ssl.create_default_context()).wrap_socket(raw, server_hostname=peer.host)
        sock.sendall(START + message + END)
        received = b""
        while not received.endswith(END):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(
                    f"the peer closed the connection {'after ' + str(len(received)) + ' bytes ' if received else ''}without an ACK"
                )
            received += chunk
            if len(received) > MAX_ACK_BYTES:
                raise ConnectionError("the answer is over 1 MiB without an end of block")
        return received


def judge(answer: bytes, sent_id: str) -> Delivery:
    """What an MLLP answer says: see the module docstring."""
    text = answer.removeprefix(START).removesuffix(END).decode("utf-8", errors="replace").strip("\r\n")
    try:
        ack = parse_message(text.replace("\n", "\r"), find_groups=False)
        code = str(ack.msa.msa_1.value)
        acked = str(ack.msa.msa_2.value)
        detail = str(ack.msa.msa_3.value or "")
        errors = [str(seg.to_er7()) for seg in ack.children if seg.name == "ERR"]
    except (HL7apyException, AttributeError, IndexError) as exc:
        return Delivery(delivered=False, retryable=True, summary=f"the answer is not an HL7 ACK ({exc}): {text[:200]!r}")
    item = {"ack_code": code, "acknowledged_control_id": acked, "text": detail, "errors": errors}
    if acked != sent_id:
        return Delivery(
            delivered=False, retryable=True, summary=f"the ACK acknowledges message {acked!r}, not ours ({sent_id!r})", items=(item,)
        )
    why = f": {detail}" if detail else (f": {errors[0]}" if errors else "")
    if code in ("AA", "CA"):
        return Delivery(delivered=True, retryable=False, summary=f"ACK {code}{why}", items=(item,))
    if code in ("AR", "CR"):
        return Delivery(delivered=False, retryable=True, summary=f"rejected by the receiver (NAK {code}){why}", items=(item,))
    if code in ("AE", "CE"):
        return Delivery(delivered=False, retryable=False, summary=f"refused by the receiver (NAK {code}){why}", items=(item,))
    return Delivery(delivered=False, retryable=True, summary=f"unknown acknowledgment code {code!r}{why}", items=(item,))


# -- the message ----------------------------------------------------------------------------------


def oru_r01(facts: ReportFacts, apps: Applications, message_id: str, created_at: datetime) -> bytes:
    """The ORU^R01 of a report, as ER7 bytes (UTF-8, declared in MSH-18 when it is not ASCII)."""
    status = facts.status.value
    m = Message("ORU_R01", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
    m.msh.msh_3 = escape(apps.sending_application)
    m.msh.msh_4 = escape(apps.sending_facility)
    if apps.receiving_application:
        m.msh.msh_5 = escape(apps.receiving_application)
    if apps.receiving_facility:
        m.msh.msh_6 = escape(apps.receiving_facility)
    m.msh.msh_7 = _ts(created_at)
    m.msh.msh_9 = "ORU^R01^ORU_R01"
    m.msh.msh_10 = message_id
    m.msh.msh_11 = "P"  # processing ID: production
    # MSH-15/16 left empty: original acknowledgment mode, the receiver answers AA, AE or AR
    result = m.add_group("ORU_R01_PATIENT_RESULT")
    pid = result.add_group("ORU_R01_PATIENT").pid
    pid.pid_1 = "1"
    pid.pid_3 = f"{escape(facts.patient_id)}^^^^PI" if facts.patient_id else ""
    pid.pid_5 = _xpn(facts.patient_name) or '""'
    if facts.patient_birth_date:
        pid.pid_7 = _date(facts.patient_birth_date)
    if facts.patient_sex in ("M", "F", "O"):
        pid.pid_8 = facts.patient_sex
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    accession = escape(facts.accession_number)
    order.orc.orc_1 = "RE"  # observations to follow
    if accession:
        order.orc.orc_2 = accession
        order.obr.obr_2 = accession
        order.obr.obr_3 = accession
        order.obr.obr_18 = accession  # placer field 1: the accession number, as IHE SWF sends it
    order.obr.obr_1 = "1"
    order.obr.obr_4 = REPORT_CODE
    if facts.study_date:
        order.obr.obr_7 = _date(facts.study_date)
    order.obr.obr_22 = _ts(facts.verified_at or facts.observed_at)
    order.obr.obr_24 = "RAD"
    order.obr.obr_25 = status
    if facts.verifier_name:
        order.obr.obr_32 = "&" + "&".join(escape(p) for p in _name_parts(facts.verifier_name))
    observed = _ts(facts.verified_at or facts.observed_at)
    equipment = f"{facts.model.device_uid}^{escape(facts.model.name + ' ' + facts.model.version)}"
    observations: list[tuple[str, str, str, list[str]]] = [("HD", STUDY_CODE, "", [facts.study_uid])]
    for number, finding in enumerate(facts.findings, start=1):
        observations.append(("HD", SERIES_CODE, str(number), [finding.series_uid]))
        observations.append(("TX", FINDINGS_CODE, str(number), text_lines(finding.text)))
    observations.append(("TX", IMPRESSION_CODE, "", text_lines(facts.impression)))
    for set_id, (value_type, code, sub_id, values) in enumerate(observations, start=1):
        obx = order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1 = str(set_id)
        obx.obx_2 = value_type
        obx.obx_3 = code
        if sub_id:
            obx.obx_4 = sub_id
        for value in values:
            obx.add_field("obx_5").value = value
        obx.obx_11 = status
        obx.obx_14 = observed
        if facts.verifier_name:
            obx.obx_16 = "^" + _xpn(facts.verifier_name)
        if value_type == "TX":
            obx.obx_18 = equipment
    text = str(m.to_er7())
    try:
        data = text.encode("ascii")
    except UnicodeEncodeError:
        m.msh.msh_18 = "UNICODE UTF-8"
        text = str(m.to_er7())
        data = text.encode("utf-8")
    m.validate()  # the 2.5.1 structure and data types: a bad message fails the build, not the RIS
    return data + b"\r"


def escape(text: str) -> str:
    """HL7 escape sequences for the delimiters (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\); a line break becomes a space."""
    out = text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("&", "\\T\\").replace("~", "\\R\\")
    return " ".join(out.splitlines())


def text_lines(text: str) -> list[str]:
    """A TX value (OBX-5), escaped: one repetition per line (TX reads the repetition separator as a line break)."""
    return [escape(line) for line in text.splitlines()] or ['""']


def _name_parts(dicom_name: str) -> list[str]:
    """DICOM Family^Given^Middle^Prefix^Suffix → HL7 XPN order Family, Given, Middle, Suffix, Prefix."""
    parts = (dicom_name.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = parts
    return [family, given, middle, suffix, prefix]


def _xpn(dicom_name: str) -> str:
    return "^".join(escape(p) for p in _name_parts(dicom_name)).rstrip("^")


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S%z") if moment.tzinfo else moment.strftime("%Y%m%d%H%M%S")


def _date(day: date) -> str:
    return day.strftime("%Y%m%d")
