"""Drafting with real parts: instances received by the listener, a tiny real model, the SR on disk
and its rows in the database (SQLite and PostgreSQL), with the races a redelivered job can run into."""

from __future__ import annotations

import dataclasses
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update

from dicom_io.header_facts import HeaderFacts
from dicom_io.image_views import ImageView
from dicom_io.key_slices import KeySliceSpec
from dicom_io.model_input import prepare_series
from dicom_io.sr import AlgorithmInfo, SeriesFinding, read_findings, read_impression, write_draft_sr
from models.captioner import Captioner
from models.demo import DEMO_MODEL_NAME, DEMO_NOTICE
from service.schema import AuditEvent, Dispatch, Draft, Instance, Job, SRDocument
from tests.conftest import storescu
from tests.workers.conftest import CT, MR, make_drafter, runner
from workers.drafting import Drafter, NotOurs, printable, sr_evidence, with_demo_notice


@pytest.mark.peers
def test_a_study_becomes_one_draft_sr_with_its_rows_and_audit_trail(db, clock, settings, captioner, job_id):
    outcome = runner(db, clock).run(job_id, make_drafter(db, clock, captioner, settings).draft)
    assert outcome == "succeeded"
    with db.session() as s:
        job = s.get(Job, job_id)
        doc = s.scalars(select(SRDocument)).one()
        drafts = list(s.scalars(select(Draft)))
        dispatch = s.scalars(select(Dispatch)).one()
        actions = list(s.scalars(select(AuditEvent.action).where(AuditEvent.at >= job.started_at).order_by(AuditEvent.id)))
    assert job.status == "succeeded" and job.inferred_at and job.sr_written_at and job.acknowledged_at is None
    assert job.started_at <= job.inferred_at <= job.sr_written_at
    assert (doc.kind, doc.completion_flag, doc.verification_flag, doc.job_id) == ("draft", "PARTIAL", "UNVERIFIED", job_id)
    assert [d.series_uid for d in drafts] == [pydicom.dcmread(CT[0]).SeriesInstanceUID]
    assert len(drafts[0].key_images) == 3 and drafts[0].weights_sha256 == captioner.identity.weights_sha256
    assert (dispatch.destination, dispatch.status) == ("ORTHANC@127.0.0.1:4242", "pending")
    assert actions[actions.index("job.started") :] == ["job.started", "sr.written", "output.built", "dispatch.queued", "job.succeeded"]

    sr = pydicom.dcmread(doc.path)
    assert sr.SOPInstanceUID == doc.sop_instance_uid and sr.StudyInstanceUID == pydicom.dcmread(CT[0]).StudyInstanceUID
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("PARTIAL", "UNVERIFIED", "PRELIMINARY")
    (finding,) = read_findings(sr)
    assert finding.text == drafts[0].text
    assert [r.sop_instance_uid for r in finding.key_images] == [k["sop_instance_uid"] for k in drafts[0].key_images]
    check = subprocess.run(["dciodvfy", "-new", doc.path], capture_output=True, text=True)
    assert " Error " not in check.stdout + check.stderr, check.stderr


@pytest.mark.peers
def test_a_redelivered_job_never_yields_a_second_sr(db, clock, settings, captioner, job_id):
    drafter = make_drafter(db, clock, captioner, settings)
    assert runner(db, clock).run(job_id, drafter.draft) == "succeeded"
    assert runner(db, clock).run(job_id, drafter.draft) == "skipped"  # the broker delivers it again
    with db.session() as s:  # an operator re-queues it by hand: the SR for this version and model exists
        s.execute(update(Job).where(Job.id == job_id).values(status="queued"))
    assert runner(db, clock).run(job_id, drafter.draft) == "succeeded"
    with db.session() as s:
        assert s.scalar(select(SRDocument.id).where(SRDocument.job_id == job_id)) is not None
        assert len(s.scalars(select(SRDocument)).all()) == 1
    assert len(list(settings.storage.reports_dir.rglob("*.dcm"))) == 1


class RacingModel:
    """The real model, but while it runs, a second worker that took over the (stale) job finishes first."""

    def __init__(self, model: Captioner, other: Drafter, job_id: int) -> None:
        self.model, self.other, self.job_id = model, other, job_id
        self.identity, self.views = model.identity, model.views

    def caption(self, *args, **kwargs):
        assert self.other.draft(self.job_id) == "succeeded"
        return self.model.caption(*args, **kwargs)


@pytest.mark.peers
def test_two_workers_racing_on_one_job_commit_one_sr_and_leave_no_orphan_file(db, clock, settings, captioner, job_id):
    assert runner(db, clock).claim(job_id)
    other = make_drafter(db, clock, captioner, settings, actor="worker:other")
    mine = make_drafter(db, clock, RacingModel(captioner, other, job_id), settings)
    with pytest.raises(NotOurs):
        mine.draft(job_id)
    with db.session() as s:
        (doc,) = s.scalars(select(SRDocument)).all()
        assert s.get(Job, job_id).worker == "worker:other"
    assert [p.name for p in settings.storage.reports_dir.rglob("*.dcm")] == [f"{doc.sop_instance_uid}.dcm"]


@pytest.mark.peers
def test_a_job_superseded_while_it_ran_writes_no_sr(db, clock, settings, captioner, job_id):
    assert runner(db, clock).claim(job_id)
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status="superseded"))
    with pytest.raises(NotOurs):
        make_drafter(db, clock, captioner, settings).draft(job_id)
    with db.session() as s:
        assert s.scalars(select(SRDocument)).all() == []
    assert list(settings.storage.reports_dir.rglob("*.dcm")) == []


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_every_key_image_of_a_study_goes_to_the_model_in_one_call_for_ct_and_mr(db, listener, clock, assembler, settings, captioner):
    assert storescu(listener, CT).returncode == 0
    assert storescu(listener, MR).returncode == 0
    clock.advance(settings.quiet_seconds + 1)
    job_ids = assembler.tick()
    assert len(job_ids) == 2  # two studies: one job each
    calls: list[int] = []

    class Counting:
        identity, views = captioner.identity, captioner.views

        def caption(self, inputs, *args, **kwargs):
            calls.append(len(inputs["clip"]))
            return captioner.caption(inputs, *args, **kwargs)

    for job in job_ids:
        assert runner(db, clock).run(job, make_drafter(db, clock, Counting(), settings).draft) == "succeeded"
    assert calls == [3, 3]  # every key image of a study in one call, batched inside the model
    with db.session() as s:
        modalities = sorted(s.scalars(select(Draft.modality)))
    assert modalities == ["CT", "MR"]


@pytest.mark.peers
def test_missing_instance_files_fail_the_job_at_once_with_the_reason(db, clock, settings, captioner, job_id):
    for f in settings.storage.instances_dir.rglob("*.dcm"):
        f.unlink()
    assert runner(db, clock).run(job_id, make_drafter(db, clock, captioner, settings).draft) == "failed"
    with db.session() as s:
        job = s.get(Job, job_id)
    assert job.status == "failed" and "missing" in job.error and job.attempts == 1


def test_model_output_becomes_valid_dicom_text():
    assert printable("\ufffd\x00small\x1b lesion,\n\n  left\x7f.") == "small lesion, left ."
    assert printable("\x00\ufffd") == ""


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_any_captioner_family_drafts_and_the_sr_names_it(db, clock, settings, job_id, tmp_path):
    """A CNN-LSTM checkpoint (MEDCAP_MODEL could point at it) goes through the same drafting; it is
    given its own view (MobileNet's normalisation), and no CLIP or 1024-px SAM view is computed."""
    from models import checkpoint
    from models.cnn_lstm import tiny_cnn_lstm
    from tests.models.parts import CAPTIONS

    model, vocab = tiny_cnn_lstm(CAPTIONS, image_size=64)
    checkpoint.save(model, vocab, tmp_path / "cnn-lstm", checkpoint.Provenance(sources=[{"part": "all", "source": "random (tests)"}]))
    loaded = Captioner.load(tmp_path / "cnn-lstm", "cpu")
    assert [(v.name, v.size, v.normalisation) for v in loaded.views] == [("mobilenet", 64, "mean_std")]
    views: list[dict[str, tuple[int, ...]]] = []

    class Recording:
        identity, views = loaded.identity, loaded.views

        def caption(self, inputs, *args, **kwargs):
            views.append({name: array.shape for name, array in inputs.items()})
            return loaded.caption(inputs, *args, **kwargs)

    assert runner(db, clock).run(job_id, make_drafter(db, clock, Recording(), settings).draft) == "succeeded"
    assert views == [{"mobilenet": (3, 3, 64, 64)}]  # only the view the model reads is computed
    with db.session() as s:
        doc = s.scalars(select(SRDocument)).one()
        draft = s.scalars(select(Draft)).one()
    assert (draft.model_name, draft.model_type) == ("CNN-LSTM", "cnn_lstm")
    assert draft.weights_sha256 == loaded.identity.weights_sha256
    sr = pydicom.dcmread(doc.path)
    assert sr.ContributingEquipmentSequence[-1].ManufacturerModelName == "CNN-LSTM"
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("PARTIAL", "UNVERIFIED")


@pytest.mark.peers
def test_a_draft_reads_each_instance_file_once(db, clock, settings, captioner, job_id, dcmread_calls):
    with db.session() as s:
        stored = sorted(Path(p) for p in s.scalars(select(Instance.path)))
    assert len(stored) == len(CT)
    dcmread_calls.clear()  # receiving is not drafting
    assert runner(db, clock).run(job_id, make_drafter(db, clock, captioner, settings).draft) == "succeeded"
    assert sorted(dcmread_calls) == stored  # loading reads each once; the SR's evidence comes from those headers


@pytest.mark.parametrize("files", [CT, MR], ids=["ct", "mr"])
def test_the_evidence_from_the_kept_headers_makes_the_same_sr_as_the_files_read_again(files, dcmread_calls):
    series = prepare_series(files, key_slices=KeySliceSpec(strategy="uniform", n=3), views=[ImageView("clip", 32, "clip")])
    kept = sr_evidence(series)
    assert sorted(dcmread_calls) == sorted(files)  # prepare_series read each file once, sr_evidence none
    assert sorted(str(ds.SOPInstanceUID) for ds in kept) == sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in files)
    by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    reread = [pydicom.dcmread(by_uid[str(ds.SOPInstanceUID)], stop_before_pixels=True) for ds in kept]  # as drafting did
    findings = [
        SeriesFinding(
            s.series_uid, "finding", [(s.series.sop_class_uid, u, f) for u, f in zip(s.sop_instance_uids, s.key_slices.frames, strict=True)]
        )
        for s in series
    ]
    algorithm = AlgorithmInfo("demo", "1", "a" * 64, "fast")
    at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    uid = "1.2.826.0.1.3680043.8.498.1"
    ours, theirs = (write_draft_sr(findings, "impression", algorithm, e, series_instance_uid=uid, created_at=at) for e in (kept, reread))
    assert ours.PatientID == reread[0].PatientID and ours.StudyInstanceUID == reread[0].StudyInstanceUID
    for sr in (ours, theirs):  # stamped with the time of writing by highdicom
        del sr.InstanceCreationDate, sr.InstanceCreationTime
        for item in sr.ContributingEquipmentSequence:
            item.ContributionDateTime = None
    differ = {e.keyword for e in ours if theirs.get(e.tag) != e} | {e.keyword for e in theirs if e.tag not in ours}
    assert differ == {"SOPInstanceUID"}  # a fresh UID per SR; patient, study, equipment and evidence are the same


@pytest.mark.peers
def test_the_draft_is_grounded_on_the_header_and_its_removals_are_kept_with_it(db, clock, settings, captioner, job_id):
    """The real model's captions, each after a sentence that contradicts the head CT's header (as the
    demo model writes them): the sentence leaves the draft and the SR, and its removal is recorded."""
    from dicom_io.sr import read_procedures
    from models.grounding import contradictions, sentences

    wrong = "axial mr of the chest large hypointense lesion in the anterior lung"

    class Contradicting:
        identity, views = captioner.identity, captioner.views

        def caption(self, inputs, *args, **kwargs):
            return [f"{wrong}. {c}" for c in captioner.caption(inputs, *args, **kwargs)]

    assert runner(db, clock).run(job_id, make_drafter(db, clock, Contradicting(), settings).draft) == "succeeded"
    with db.session() as s:
        doc = s.scalars(select(SRDocument)).one()
        draft = s.scalars(select(Draft)).one()
        written = s.scalars(select(AuditEvent).where(AuditEvent.action == "sr.written")).one()
    assert draft.text.startswith("CT head, axial:") and wrong not in draft.text
    assert draft.header_facts is not None and draft.header_facts["modality"] == "CT" and draft.header_facts["plane"] == "axial"
    assert draft.removed_sentences is not None and draft.removed_sentences[0]["sentence"] == wrong
    assert "names MR; the header says CT (Modality)" in draft.removed_sentences[0]["reasons"]
    assert written.details["sentences_removed"] == len(draft.removed_sentences)
    facts = HeaderFacts.from_dict(draft.header_facts)
    kept = sentences([draft.text.removeprefix("CT head, axial:")])
    assert all(contradictions(s, facts) == [] for s in kept if not s.startswith("("))
    sr = pydicom.dcmread(doc.path)
    (finding,) = read_findings(sr)
    assert finding.text == draft.text and wrong not in str(doc.impression)
    assert finding.finding_site is not None and (finding.finding_site.value, finding.finding_site.meaning) == ("69536005", "Head")
    assert [p.value for p in read_procedures(sr)] == ["77477000"]
    check = subprocess.run(["dciodvfy", "-new", doc.path], capture_output=True, text=True)
    assert " Error " not in check.stdout + check.stderr, check.stderr


def test_a_header_without_readable_facts_grounds_nothing_and_fails_nothing(monkeypatch):
    import workers.drafting as drafting

    (item,) = prepare_series(CT, views=(ImageView("clip", 32, "clip"),), key_slices=KeySliceSpec(n=1))
    assert drafting.facts_of(item).modality == "CT"

    def unreadable(series):
        raise ValueError("ImageOrientationPatient is degenerate")

    monkeypatch.setattr(drafting, "series_facts", unreadable)
    facts = drafting.facts_of(item)
    assert (facts.modality, facts.region, facts.plane) == (None, None, None)
    assert facts.conflicts == ("header facts could not be read: ImageOrientationPatient is degenerate",)


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_later_versions_draft_references_and_names_the_draft_it_supersedes(db, listener, clock, assembler, settings, captioner):
    from tests.pipeline import draft_study

    first_id = draft_study(db, clock, settings, listener, assembler, captioner, CT[:4])
    second_id = draft_study(db, clock, settings, listener, assembler, captioner, CT[4:])  # late images: study version 2
    with db.session() as s:
        first, second = s.get(SRDocument, first_id), s.get(SRDocument, second_id)
        event = s.scalars(
            select(AuditEvent).where(AuditEvent.action == "sr.written", AuditEvent.object_id == second.sop_instance_uid)
        ).one()
    assert first.predecessor_id is None and second.predecessor_id == first.id
    assert event.details["supersedes"] == first.sop_instance_uid
    old, new = pydicom.dcmread(first.path), pydicom.dcmread(second.path)
    assert "PredecessorDocumentsSequence" not in old and (old.InstanceNumber, new.InstanceNumber) == (1, 2)
    (study,) = new.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (ref,) = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID) == (old.StudyInstanceUID, old.SeriesInstanceUID)
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (old.SOPClassUID, old.SOPInstanceUID)
    sentence = f"Supersedes the AI draft of study version 1 (SR {old.SOPInstanceUID})"
    assert second.impression.startswith(sentence) and sentence not in (first.impression or "")
    check = subprocess.run(["dciodvfy", "-new", second.path], capture_output=True, text=True)
    assert not [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")], check.stderr


class Renamed:
    """The real model under another name (the demo model's is set in its config.json by models/demo.py)."""

    def __init__(self, model: Captioner, name: str) -> None:
        self.model, self.views = model, model.views
        self.identity = dataclasses.replace(model.identity, name=name)

    def caption(self, *args, **kwargs):
        return self.model.caption(*args, **kwargs)


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_demo_models_srs_say_it_is_for_trying_medcap_only(db, clock, settings, captioner, job_id):
    assert (
        runner(db, clock).run(job_id, make_drafter(db, clock, Renamed(captioner, DEMO_MODEL_NAME), settings, destinations=()).draft)
        == "succeeded"
    )
    with db.session() as s:
        doc = s.scalars(select(SRDocument)).one()
    sr = pydicom.dcmread(doc.path)
    assert read_impression(sr).startswith(DEMO_NOTICE) and doc.impression.startswith(DEMO_NOTICE)
    names = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeMeaning == "Device Observer Name"]
    assert [n.TextValue for n in names] == [f"{DEMO_MODEL_NAME} {captioner.identity.version}"]
    assert sr.ContributingEquipmentSequence[-1].ManufacturerModelName == DEMO_MODEL_NAME
    check = subprocess.run(["dciodvfy", "-new", doc.path], capture_output=True, text=True)
    assert not [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")], check.stderr


def test_other_models_drafts_carry_no_demo_notice():
    assert with_demo_notice("Normal.", "MSMedCap") == "Normal."
    assert with_demo_notice("Normal.", DEMO_MODEL_NAME) == f"{DEMO_NOTICE} Normal."


class OtherWeights(Renamed):
    """The real model under other weights' hash: another model, as far as drafts and their keys go."""

    def __init__(self, model: Captioner) -> None:
        super().__init__(model, "Other model")
        self.identity = dataclasses.replace(self.identity, weights_sha256="ab" * 32)


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_draft_supersedes_its_own_models_earlier_draft_else_the_newest(db, listener, clock, assembler, settings, captioner):
    from tests.pipeline import draft_study

    v1 = draft_study(db, clock, settings, listener, assembler, captioner, CT[:3])
    v2 = draft_study(db, clock, settings, listener, assembler, OtherWeights(captioner), CT[3:6])  # no draft of its own model: the newest
    v3 = draft_study(db, clock, settings, listener, assembler, captioner, CT[6:])  # its own model's, though v2's is newer
    with db.session() as s:
        docs = {i: s.get(SRDocument, i) for i in (v1, v2, v3)}
    assert (docs[v2].predecessor_id, docs[v3].predecessor_id) == (v1, v1)
    assert [pydicom.dcmread(docs[i].path).InstanceNumber for i in (v1, v2, v3)] == [1, 2, 3]
    assert docs[v3].impression.startswith(f"Supersedes the AI draft of study version 1 (SR {docs[v1].sop_instance_uid})")
