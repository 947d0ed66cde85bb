"""The report as a FHIR R4 DiagnosticReport, shaped after IHE Imaging Diagnostic Report (IDR):
``fhir+http(s)://host[:port]/fhir-base``.

One resource per study, found by its identifier (``fhir_report_identifier_system`` | Study Instance
UID): the draft creates it (status ``preliminary``), the verified report updates the same resource
(``final``; ``corrected`` for a later verified report of the study). It carries the ``conclusion``
(the impression), the order (``basedOn`` by accession number), the patient, the ``imagingStudy`` (by
Study Instance UID), one contained Observation per captioned series with its text, and, once
verified, the approving radiologist as ``resultsInterpreter``. FHIR R4 admits no Device as a
DiagnosticReport performer, so the model is a contained Device that each finding Observation names
as its ``device``. The resource is built with ``fhir.resources`` (R4B models: R4's DiagnosticReport,
Observation, Device and Practitioner are unchanged in R4B) and validated before it is stored.

One attempt: search by identifier; none → conditional create (``POST`` with ``If-None-Exist``, so a
retried create makes no second resource); one → ``PUT`` to its id with ``If-Match`` on the version
read. A draft arriving after the verified report (a late retry) does not overwrite it. 2xx is
delivered; 408/409/412/429/5xx and no answer are retried; other 4xx are refusals.
"""

from __future__ import annotations

import base64
import json
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

import httpx
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from service.outputs import report_facts
from service.outputs.http_peer import HttpPeer, base_url, refused, transport_failure
from service.outputs.kind import Artefact, Delivery, OutputKind
from service.outputs.report_facts import ReportFacts
from service.schema import SRDocument
from service.storage import Storage, StorageError

if TYPE_CHECKING:
    from service.settings import Settings

PREFIX = "fhir"
FHIR_JSON = "application/fhir+json"
LOINC = "http://loinc.org"
DICOM_UID = "urn:dicom:uid"
#: how far along a report is: a later status is never overwritten by an earlier one
RANK = {"registered": 0, "partial": 1, "preliminary": 1, "final": 2, "amended": 3, "corrected": 3, "appended": 3}
RETRYABLE_HERE = frozenset({409, 412})  # another writer got there between our read and our write


class FhirReport(OutputKind):
    name = "fhir-diagnostic-report"
    media_type = FHIR_JSON

    def __init__(
        self, peer: HttpPeer | None = None, *, identifier_system: str = "urn:medcap:diagnostic-report", storage: Storage | None = None
    ) -> None:
        if not identifier_system:
            raise ValueError("FhirReport.identifier_system must not be empty")
        self.peer = peer or HttpPeer()
        self.identifier_system = identifier_system
        self.storage = storage or Storage("medcap-data")

    @classmethod
    def from_settings(cls, settings: Settings) -> FhirReport:
        auth = settings.fhir_authorization
        peer = HttpPeer(
            auth.get_secret_value() if auth else None,
            settings.output_tls_ca_file,
            settings.output_tls_cert_file,
            settings.output_tls_key_file,
            settings.dispatch_timeout_seconds,
        )
        return cls(peer, identifier_system=settings.fhir_report_identifier_system, storage=settings.storage)

    def accepts(self, destination: str) -> bool:
        try:
            base_url(destination, PREFIX)
        except ValueError:
            return False
        return True

    def build(self, report: SRDocument) -> Artefact:
        facts = report_facts.read(self.storage, report)
        resource = diagnostic_report(facts, self.identifier_system)
        data = resource.model_dump_json(exclude_none=True).encode("utf-8")
        stored = self.storage.write_output(facts.study_uid, report.sop_instance_uid, "fhir.json", data)
        return Artefact(stored.path, self.media_type, stored.sha256)

    def send(self, artefact: Artefact, destination: str) -> Delivery:
        try:
            base = base_url(destination, PREFIX)
            resource: dict[str, Any] = json.loads(self.storage.read_bytes(artefact.path))
            identifier = resource["identifier"][0]
            token = f"{identifier['system']}|{identifier['value']}"
        except (ValueError, StorageError, OSError) as exc:
            return Delivery(delivered=False, retryable=False, summary=str(exc))
        except (KeyError, IndexError, TypeError) as exc:  # a stored artefact that is not our resource
            return Delivery(
                delivered=False, retryable=False, summary=f"{artefact.path} is not a DiagnosticReport with an identifier: {exc!r}"
            )
        try:
            with self.peer.client() as client:
                return self._send(client, base, resource, token)
        except httpx.HTTPError as exc:
            return transport_failure(exc, base)

    def _send(self, client: httpx.Client, base: str, resource: dict[str, Any], token: str) -> Delivery:
        headers = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}
        found = client.get(f"{base}/DiagnosticReport", params={"identifier": token}, headers={"Accept": FHIR_JSON})
        if not found.is_success:
            return _refused(found, "searching DiagnosticReport by identifier")
        try:
            matches = [
                e["resource"] for e in found.json().get("entry", []) if e.get("resource", {}).get("resourceType") == "DiagnosticReport"
            ]
        except (ValueError, AttributeError, KeyError, TypeError) as exc:
            return Delivery(delivered=False, retryable=True, summary=f"the search answer is not a FHIR Bundle: {exc}")
        if len(matches) > 1:
            ids = ", ".join(str(m.get("id")) for m in matches)
            return Delivery(delivered=False, retryable=False, summary=f"{len(matches)} DiagnosticReports carry identifier {token} ({ids})")
        if not matches:
            response = client.post(f"{base}/DiagnosticReport", json=resource, headers={**headers, "If-None-Exist": f"identifier={token}"})
            return _written(response, "created", resource["status"])
        current = matches[0]
        if RANK.get(str(current.get("status")), 0) > RANK[resource["status"]]:
            item = {"id": current.get("id"), "status_there": current.get("status"), "not_sent": resource["status"]}
            return Delivery(
                delivered=True,
                retryable=False,
                summary=f"not sent: DiagnosticReport/{current.get('id')} is already {current.get('status')} (a later report superseded this one)",
                items=(item,),
            )
        version = (current.get("meta") or {}).get("versionId")
        if version:
            headers["If-Match"] = f'W/"{version}"'
        body = {**resource, "id": current["id"]}
        response = client.put(f"{base}/DiagnosticReport/{current['id']}", json=body, headers=headers)
        return _written(response, "updated", resource["status"])


def _written(response: httpx.Response, what: str, status: str) -> Delivery:
    if not response.is_success:
        return _refused(response, f"DiagnosticReport not {what}")
    try:
        answer = response.json() if response.content else {}
    except ValueError:
        answer = {}
    resource_id = answer.get("id") if isinstance(answer, dict) else None
    location = response.headers.get("Location") or response.headers.get("Content-Location")
    item = {"http_status": response.status_code, "id": resource_id, "location": location, "status": status}
    return Delivery(
        delivered=True,
        retryable=False,
        summary=f"DiagnosticReport/{resource_id} {what} ({status}, HTTP {response.status_code})",
        items=(item,),
    )


def _refused(response: httpx.Response, what: str) -> Delivery:
    delivery = refused(response, what, _outcome_text(response))
    if response.status_code in RETRYABLE_HERE:
        return Delivery(delivered=False, retryable=True, summary=delivery.summary, items=delivery.items)
    return delivery


def _outcome_text(response: httpx.Response) -> str:
    """The diagnostics of an OperationOutcome answer, when it is one."""
    try:
        answer = response.json()
        return "; ".join(str(i.get("diagnostics") or i.get("details", {}).get("text") or i.get("code")) for i in answer.get("issue", []))[
            :500
        ]
    except (ValueError, AttributeError, TypeError):
        return ""


# -- the resource ---------------------------------------------------------------------------------


def diagnostic_report(facts: ReportFacts, identifier_system: str) -> DiagnosticReport:
    """The DiagnosticReport of a report, validated by the R4(B) model."""
    status = facts.status.fhir
    subject: dict[str, Any] = {"type": "Patient", "display": _display(facts.patient_name) or "unknown"}
    if facts.patient_id:
        subject["identifier"] = {"value": facts.patient_id}
    study = {"type": "ImagingStudy", "identifier": {"system": DICOM_UID, "value": f"urn:oid:{facts.study_uid}"}}
    model = facts.model
    device: dict[str, Any] = {
        "resourceType": "Device",
        "id": "model",
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{model.device_uid}"}],
        "deviceName": [{"name": model.name, "type": "model-name"}],
        "type": {"text": "AI report drafting model (image captioning)"},
        "version": [{"value": model.version}] if model.version else None,
        "manufacturer": model.manufacturer or None,
    }
    contained: list[dict[str, Any]] = [device]
    results = []
    for number, finding in enumerate(facts.findings, start=1):
        contained.append(
            {
                "resourceType": "Observation",
                "id": f"finding-{number}",
                "status": status,
                "code": {"coding": [{"system": LOINC, "code": "18782-3", "display": "Radiology Study observation (narrative)"}]},
                "subject": subject,
                "effectiveDateTime": _iso(facts.observed_at),
                "valueString": finding.text,
                "device": {"reference": "#model"},
                "derivedFrom": [{**study, "display": f"series {finding.series_uid}"}],
            }
        )
        results.append({"reference": f"#finding-{number}"})
    interpreters = None
    if facts.verifier_name:
        contained.append({"resourceType": "Practitioner", "id": "radiologist", "name": [_human_name(facts.verifier_name)]})
        interpreters = [{"reference": "#radiologist", "display": _display(facts.verifier_name)}]
    text = "\n\n".join([f"Series {f.series_uid}:\n{f.text}" for f in facts.findings] + [f"Impression:\n{facts.impression}"])
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "contained": contained,
        "identifier": [{"system": identifier_system, "value": facts.study_uid}],
        "basedOn": [
            {
                "type": "ServiceRequest",
                "identifier": {
                    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
                    "value": facts.accession_number,
                },
            }
        ]
        if facts.accession_number
        else None,
        "status": status,
        "category": [{"coding": [{"system": LOINC, "code": "LP29684-5", "display": "Radiology"}]}],
        "code": {"coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}]},
        "subject": subject,
        "effectiveDateTime": _iso_date(facts.study_date) if facts.study_date else None,
        "issued": _iso(facts.verified_at or facts.observed_at),
        "resultsInterpreter": interpreters,
        "result": results,
        "imagingStudy": [study],
        "conclusion": facts.impression,
        "presentedForm": [
            {
                "contentType": "text/plain; charset=utf-8",
                "language": "en",
                "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
                "title": "MedCap AI draft - preliminary, not verified" if status == "preliminary" else "Radiology report",
            }
        ],
    }
    return DiagnosticReport.model_validate(_drop_none(report))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _human_name(dicom_name: str) -> dict[str, Any]:
    family, given, middle, prefix, suffix = (dicom_name.split("=")[0].split("^") + [""] * 5)[:5]
    name: dict[str, Any] = {"text": _display(dicom_name)}
    if family:
        name["family"] = family
    if given or middle:
        name["given"] = [p for p in (given, middle) if p]
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name


def _display(dicom_name: str) -> str:
    """Family^Given^Middle^Prefix^Suffix → "Prefix Given Middle Family Suffix"."""
    family, given, middle, prefix, suffix = (dicom_name.split("=")[0].split("^") + [""] * 5)[:5]
    return " ".join(p for p in (prefix, given, middle, family, suffix) if p)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _iso_date(day: date) -> str:
    return day.isoformat()
