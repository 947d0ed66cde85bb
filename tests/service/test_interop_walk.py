"""The issue's "done when" walk, end to end with real peers: one CT study sent by STOW-RS to the real web app,
drafted, its draft sent as ORU^R01 (P) over MLLP and as a preliminary FHIR DiagnosticReport (and as an SR over
STOW-RS to Orthanc's DICOMweb plugin), approved, and the verified report sent as ORU F, DiagnosticReport final and
SR over STOW-RS. docs/conformance.md ("The walk") shows the same by hand and this test's recorded summary."""

from __future__ import annotations

import pytest
from hl7apy.parser import parse_message
from sqlalchemy import select

from dicom_io.key_slices import KeySliceSpec
from service import cli, outputs
from service.review import Reviews
from service.schema import Association, Instance, Job, SRDocument
from service.users import Users
from tests.conftest import make_assembler
from tests.pipeline import CT, runner
from tests.service.outputs.dicomweb_orthanc import BASIC
from tests.service.outputs.test_all_outputs import peers, send_all
from tests.service.web.test_dicomweb import make_server, multipart, referenced, uids
from workers.drafting import Drafter, DraftOptions

__all__ = ["make_server", "peers"]  # fixtures, used by name


@pytest.mark.peers
def test_one_study_walks_stow_in_draft_oru_p_fhir_preliminary_approval_oru_f_fhir_final_sr_stow_out(
    db, clock, make_server, publisher, captioner, peers, monkeypatch, capsys
):
    archive, ris, fhir = peers
    server = make_server(
        output_destinations=f"{archive.destination},{ris.destination},{fhir.destination}",
        stow_rs_authorization=BASIC,
        fhir_authorization="Bearer ris-token",
        hl7_receiving_application="RIS",
    )
    settings, log = server.settings, []

    # 1. STOW-RS in: every instance referenced, none failed, the request recorded as a sender
    response = server.post(multipart(*(p.read_bytes() for p in CT)))
    assert response.status_code == 200, response.text
    assert referenced(response.json()) == [uids(p)[:2] for p in CT]
    with db.session() as s:
        (request,) = s.scalars(select(Association)).all()
        assert s.scalar(select(Instance).limit(1)) is not None
    assert (request.calling_ae, request.called_ae, request.outcome, request.instances_received) == ("PACS1", "STOW-RS", "released", len(CT))
    log.append(f"STOW-RS in: HTTP {response.status_code}, {len(referenced(response.json()))} referenced, 0 failed")

    # 2. the study settles, one job, drafted
    clock.advance(settings.quiet_seconds + 1)
    (job,) = make_assembler(db, clock, settings, publisher).tick()
    kinds = outputs.configured(settings)
    options = DraftOptions(
        key_slices=KeySliceSpec(strategy="uniform", n=3),
        destinations=settings.dispatch_destinations,
        storage=settings.storage,
        outputs=kinds,
    )
    assert runner(db, clock).run(job, Drafter(db, clock, captioner, options, "worker:test").draft) == "succeeded"
    with db.session() as s:
        draft = s.scalars(select(SRDocument)).one()
        assert s.get(Job, job).status == "succeeded"
    log.append(f"draft SR {draft.sop_instance_uid}")

    # 3. the draft goes out: SR by STOW-RS, ORU^R01 P, DiagnosticReport preliminary
    first = send_all(db, clock, settings, kinds)
    assert first == dict.fromkeys(settings.dispatch_destinations, "delivered")
    assert archive.instance(draft.sop_instance_uid).VerificationFlag == "UNVERIFIED"
    (oru_p,) = [parse_message(m, find_groups=False) for m in ris.received]
    assert oru_p.obr.obr_25.value == "P" and oru_p.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and oru_p.msh.msh_12.value == "2.5.1"
    assert [v["status"] for v in fhir.history] == ["preliminary"]
    study_uid = uids(CT[0])[2]
    assert fhir.history[0]["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{study_uid}"
    log.append(f"draft dispatches: {first}; ORU OBR-25={oru_p.obr.obr_25.value}; FHIR status={fhir.history[0]['status']}")

    # 4. approval, and the verified report goes out the same ways
    reviews = Reviews(
        db, clock, storage=settings.storage, destinations=settings.dispatch_destinations, organization="General Hospital", outputs=kinds
    )
    radiologist = Users(db, clock).add("smith", "Smith^Jane", "radiologist", "correct horse battery", "cli:test")
    clock.advance(120)
    verified_uid = reviews.approve(draft.id, radiologist)
    second = send_all(db, clock, settings, kinds)
    assert second == dict.fromkeys(settings.dispatch_destinations, "delivered")
    assert archive.instance(verified_uid).VerificationFlag == "VERIFIED"
    statuses = [parse_message(m, find_groups=False).obr.obr_25.value for m in ris.received]
    assert statuses == ["P", "F"]
    (report,) = fhir.resources.values()
    assert [v["status"] for v in fhir.history] == ["preliminary", "final"] and report["resultsInterpreter"][0]["display"] == "Jane Smith"
    assert fhir.history[0]["identifier"] == fhir.history[1]["identifier"], "updated under the same identifier"
    assert report["conclusion"] and report["imagingStudy"] == fhir.history[0]["imagingStudy"]
    assert {archive.instance(uid).StudyInstanceUID for uid in (draft.sop_instance_uid, verified_uid)} == {study_uid}
    oru_f = parse_message(ris.received[1], find_groups=False)
    observations = [segment for segment in oru_f.children if segment.name == "OBX"]
    results = [(obx.obx_3.obx_3_1.value, obx.obx_11.value) for obx in observations]
    assert results[0] == ("113014", "F") and observations[0].obx_5.value == study_uid
    assert {status for _, status in results} == {"F"} and results[-1][0] == "19005-8", results
    log.append(
        f"verified SR {verified_uid}; dispatches: {second}; ORU OBR-25 sequence={statuses}; FHIR statuses={[v['status'] for v in fhir.history]}"
    )

    # 5. what an operator watches: `medcap reports` (the job, its draft and the verified report, each
    # with its destinations) and `medcap audit search --study` (every event of the study)
    monkeypatch.setenv("MEDCAP_DATABASE_URL", settings.effective_database_url)
    monkeypatch.setenv("MEDCAP_DATA_DIR", str(settings.data_dir))
    capsys.readouterr()
    assert cli.main(["reports"]) == 0
    shown = capsys.readouterr().out
    draft_part, verified_part = shown.split(f"    verified SR {verified_uid}\n")
    for part in (draft_part, verified_part):
        assert all(f"-> {d}: delivered after 1 attempt(s)" in part for d in settings.dispatch_destinations), shown
    assert cli.main(["audit", "search", "--study", study_uid]) == 0
    trail = capsys.readouterr().out
    assert trail.count("dispatch.delivered") == 6, trail
    with capsys.disabled():
        print("\n".join(["", "interop walk:", *log, "$ medcap reports", shown, "$ medcap audit search --study STUDY_UID", trail]))
