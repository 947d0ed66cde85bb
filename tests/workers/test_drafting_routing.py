"""Routing rules in the pipeline: a study received by the listener, decided series by series, drafted
with the tiny real model; what was skipped is recorded and audited with the rule's name."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select, update

from dicom_io.relabel import relabel_series
from models.captioner import Captioner
from service import routing
from service.schema import AuditEvent, Dispatch, Draft, Instance, Job, Output, RoutingDecision, SeriesRecord, SRDocument, Study
from service.study_status import list_studies
from tests.conftest import storescu
from tests.workers.conftest import CT, MR, make_drafter, runner
from workers.drafting import Drafter, DraftOptions

CT_SERIES = str(pydicom.dcmread(CT[0], stop_before_pixels=True).SeriesInstanceUID)
CT_STUDY = str(pydicom.dcmread(CT[0], stop_before_pixels=True).StudyInstanceUID)


def two_series_study(listener, tmp_path: Path) -> str:
    """The CT series from PACS1 and an MR series, put into the same study, from OUTSIDE: the MR's series UID."""
    mr = relabel_series(MR, tmp_path / "mr", study_uid=CT_STUDY)
    assert storescu(listener, CT, calling="PACS1").returncode == 0
    assert storescu(listener, mr, calling="OUTSIDE").returncode == 0
    return str(pydicom.dcmread(mr[0], stop_before_pixels=True).SeriesInstanceUID)


def drafter_with(db, clock, model, settings, rules: routing.RuleSet, models=None) -> Drafter:
    base = make_drafter(db, clock, model, settings)
    options = DraftOptions(
        key_slices=base.options.key_slices, destinations=base.options.destinations, storage=settings.storage, routing=rules
    )
    return Drafter(db, clock, model, options, "worker:test", models=models)


RULES = """
[[rules]]
name = "outside-studies"
action = "skip"
calling_ae = ["OUTSIDE"]

[[rules]]
name = "ct-heads"
modality = "CT"
body_region = "HEAD"
destinations = ["HEADPACS@127.0.0.1:4243"]
"""


@pytest.mark.peers
def test_a_rule_skips_a_series_which_is_recorded_and_audited_with_the_rule(db, listener, clock, assembler, settings, captioner, tmp_path):
    mr_series = two_series_study(listener, tmp_path)
    clock.advance(settings.quiet_seconds + 1)
    (job_id,) = assembler.tick()
    rules = routing.parse(RULES, source="site-rules.toml")

    assert runner(db, clock).run(job_id, drafter_with(db, clock, captioner, settings, rules).draft) == "succeeded"

    with db.session() as s:
        job = s.get(Job, job_id)
        doc = s.scalars(select(SRDocument)).one()
        drafts = list(s.scalars(select(Draft)))
        destinations = list(s.scalars(select(Dispatch.destination).join(Output, Output.id == Dispatch.output_id)))
        decisions = {d.series_uid: (d.rule, d.action, d.model, d.reason, d.rules_source) for d in s.scalars(select(RoutingDecision))}
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.at >= job.started_at).order_by(AuditEvent.id)))
    assert job.status == "succeeded" and doc.job_id == job_id
    assert [d.series_uid for d in drafts] == [CT_SERIES]  # the MR series was never captioned
    assert {f.series_uid for f in _findings(doc.path)} == {CT_SERIES}
    assert destinations == ["HEADPACS@127.0.0.1:4243"]  # the rule's destination, not MEDCAP_DESTINATIONS
    assert decisions == {
        CT_SERIES: ("ct-heads", "caption", "default", "captioned by rule ct-heads", "site-rules.toml"),
        mr_series: ("outside-studies", "skip", None, "skipped by rule outside-studies", "site-rules.toml"),
    }
    actions = [e.action for e in events]
    assert actions[actions.index("job.started") :] == [
        "job.started",
        "sr.written",
        "output.built",
        "dispatch.queued",
        "series.skipped",
        "job.succeeded",
    ]
    skipped = next(e for e in events if e.action == "series.skipped")
    assert (skipped.object_type, skipped.object_id, skipped.study_uid) == ("series", mr_series, CT_STUDY)
    assert skipped.details == {"rule": "outside-studies", "reason": "skipped by rule outside-studies", "job_id": job_id}

    (status,) = list_studies(db)
    assert status.skipped_series == 1 and status.state == f"job {job_id}: succeeded, 1 series skipped by rules"

    # explain: the same decisions under the same rules, why the others did not match, and what was recorded
    with db.session() as s:
        explained = routing.explain_study(s, settings.storage, rules, CT_STUDY)
    assert explained is not None and explained.version == 1
    by_series = {e.facts.series_uid: e for e in explained.series}
    assert by_series[mr_series].decision.rule == "outside-studies"
    assert by_series[mr_series].facts.calling_ae_titles == {"OUTSIDE"} and by_series[mr_series].facts.modality == "MR"
    ct = by_series[CT_SERIES]
    assert [(o.rule, o.matched, o.misses) for o in ct.outcomes] == [
        ("outside-studies", False, ("calling_ae: calling AE title PACS1 is not one of OUTSIDE",)),
        ("ct-heads", True, ()),
    ]
    assert ct.facts.body_regions == {"HEAD"} and ct.facts.instance_count == len(CT)
    text = "\n".join(explained.lines())
    assert "-> ct-heads: matched" in text and "outside-studies: did not match: calling_ae: calling AE title PACS1" in text
    assert f"version 1, series {mr_series}: skipped by rule outside-studies" in text


def _findings(path: str):
    from dicom_io.sr import read_findings

    return read_findings(pydicom.dcmread(path))


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_study_whose_every_series_is_skipped_gets_no_sr_and_runs_again_without_a_second_record(db, clock, settings, captioner, job_id):
    rules = routing.parse("[[rules]]\nname = 'mr-only'\nmodality = 'MR'\n", source="mr.toml")
    drafter = drafter_with(db, clock, captioner, settings, rules)
    assert runner(db, clock).run(job_id, drafter.draft) == "succeeded"
    with db.session() as s:
        assert s.scalars(select(SRDocument)).all() == []
        decision = s.scalars(select(RoutingDecision)).one()
        succeeded = s.scalars(select(AuditEvent).where(AuditEvent.action == "job.succeeded")).one()
        skipped = s.scalars(select(AuditEvent).where(AuditEvent.action == "series.skipped")).one()
    assert (decision.series_uid, decision.rule, decision.action) == (CT_SERIES, routing.NO_RULE, "skip")
    assert succeeded.details["result"] == "every series skipped by the routing rules ((no rule))"
    assert skipped.details["rule"] == routing.NO_RULE
    assert list(settings.storage.reports_dir.rglob("*.dcm")) == []

    with db.session() as s:  # an operator re-queues it: the decisions of this version are recorded once
        s.execute(update(Job).where(Job.id == job_id).values(status="queued"))
    assert runner(db, clock).run(job_id, drafter.draft) == "succeeded"
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(RoutingDecision)) == 1
        assert s.scalar(select(func.count()).where(AuditEvent.action == "series.skipped")) == 1


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_default_rules_caption_every_ct_and_mr_series_as_before(db, listener, clock, assembler, settings, captioner, tmp_path):
    mr_series = two_series_study(listener, tmp_path)
    clock.advance(settings.quiet_seconds + 1)
    (job_id,) = assembler.tick()
    assert runner(db, clock).run(job_id, make_drafter(db, clock, captioner, settings).draft) == "succeeded"  # no rules given
    with db.session() as s:
        doc = s.scalars(select(SRDocument)).one()
        assert {d.series_uid for d in s.scalars(select(Draft))} == {CT_SERIES, mr_series}
        assert list(s.scalars(select(Dispatch.destination))) == ["ORTHANC@127.0.0.1:4242"]
        assert {(d.rule, d.action, d.rules_source) for d in s.scalars(select(RoutingDecision))} == {
            ("default", "caption", "built-in default")
        }
        assert s.scalar(select(func.count()).where(AuditEvent.action == "series.skipped")) == 0
    assert doc.kind == "draft"


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_rule_can_send_a_series_to_another_model_one_draft_sr_per_model(db, listener, clock, assembler, settings, captioner, tmp_path):
    from models import checkpoint
    from models.cnn_lstm import tiny_cnn_lstm
    from tests.models.parts import CAPTIONS

    model, vocab = tiny_cnn_lstm(CAPTIONS, image_size=64)
    checkpoint.save(model, vocab, tmp_path / "cnn-lstm", checkpoint.Provenance(sources=[{"part": "all", "source": "random (tests)"}]))
    mr_series = two_series_study(listener, tmp_path)
    clock.advance(settings.quiet_seconds + 1)
    (job_id,) = assembler.tick()
    rules = routing.parse(
        "[models]\nsmall = 'cnn-lstm'\n[[rules]]\nname = 'mr-small'\nmodality = 'MR'\nmodel = 'small'\n"
        "destinations = []\n[[rules]]\nname = 'ct'\nmodality = 'CT'\n",
        source="models.toml",
        base_dir=tmp_path,
    )
    loaded: list[str] = []

    def models(name: str) -> Captioner:
        loaded.append(name)
        return Captioner.load(rules.models[name], "cpu")

    assert runner(db, clock).run(job_id, drafter_with(db, clock, captioner, settings, rules, models=models).draft) == "succeeded"
    assert loaded == ["small"]
    with db.session() as s:
        docs = list(s.scalars(select(SRDocument).order_by(SRDocument.id)))
        drafts = {d.series_uid: (d.model_type, d.sr_document_id) for d in s.scalars(select(Draft))}
        dispatched = {
            (d.destination, o.report_id) for d, o in s.execute(select(Dispatch, Output).join(Output, Output.id == Dispatch.output_id))
        }
        succeeded = s.scalars(select(AuditEvent).where(AuditEvent.action == "job.succeeded")).one()
    assert len(docs) == 2 and {d.job_id for d in docs} == {job_id}
    assert drafts[CT_SERIES][0] == "msmedcap" and drafts[mr_series][0] == "cnn_lstm"
    assert drafts[CT_SERIES][1] != drafts[mr_series][1]  # one SR per model
    assert dispatched == {("ORTHANC@127.0.0.1:4242", drafts[CT_SERIES][1])}  # the MR's SR stays local (destinations = [])
    assert succeeded.details["srs"] == [d.sop_instance_uid for d in docs]


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_model_this_worker_cannot_load_fails_the_job_permanently(db, clock, settings, captioner, job_id, tiny_model):
    rules = routing.parse(f"[models]\nother = '{tiny_model}'\n[[rules]]\nname = 'all'\nmodel = 'other'\n")
    assert runner(db, clock).run(job_id, drafter_with(db, clock, captioner, settings, rules).draft) == "failed"
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.error == "the routing rules chose model 'other', which this worker cannot load"
        assert s.scalars(select(RoutingDecision)).all() == []  # nothing is recorded for a job that did not succeed


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_draft_options_refuse_a_rule_destination_no_output_kind_sends_to(settings):
    rules = routing.parse("[[rules]]\nname = 'ris'\ndestinations = ['mllp://ris:2575']\n")
    with pytest.raises(ValueError, match="destination 'mllp://ris:2575' is not one of any output kind's"):
        DraftOptions(storage=settings.storage, routing=rules)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_settings_name_the_rule_file_and_start_up_validates_it(make_settings, tmp_path):
    from service.settings import SettingsError

    with pytest.raises(SettingsError, match="routing_rules: file .*missing.toml does not exist"):
        make_settings(routing_rules=tmp_path / "missing.toml")
    path = tmp_path / "rules.toml"
    path.write_text("[[rules]]\nname = 'x'\ndestinations = ['not a destination']\n")
    settings = make_settings(routing_rules=path)
    with pytest.raises(routing.RoutingError, match=r"rules.toml: rule 'x': destinations: destination 'not a destination'"):
        routing.configured(settings)
    path.write_text("[[rules]]\nname = 'x'\ndestinations = ['PACS@127.0.0.1:104']\n")
    assert routing.configured(settings).rules[0].destinations == ("PACS@127.0.0.1:104",)
    assert routing.configured(make_settings()).source == "built-in default"


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_rule_on_the_header_reads_one_header_per_series_and_skipped_series_are_never_loaded(
    db, listener, clock, assembler, settings, captioner, tmp_path, dcmread_calls
):
    two_series_study(listener, tmp_path)
    clock.advance(settings.quiet_seconds + 1)
    (job_id,) = assembler.tick()
    with db.session() as s:
        paths = {Path(p): uid for p, uid in s.execute(select(Instance.path, SeriesRecord.series_uid).join(SeriesRecord))}
    dcmread_calls.clear()
    rules = routing.parse("[[rules]]\nname = 'from-uih'\ninstitution = '^UIH$'\n")  # the MR's institution; the CT has none
    assert runner(db, clock).run(job_id, drafter_with(db, clock, captioner, settings, rules).draft) == "succeeded"
    read = [paths[p] for p in dcmread_calls]
    mr_series = next(uid for uid in paths.values() if uid != CT_SERIES)
    assert read.count(CT_SERIES) == 1  # its header, for the rule; its images are never loaded
    assert read.count(mr_series) == len(MR) + 1  # its header, then each image once


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_pattern_that_runs_out_of_time_fails_the_job_at_once_naming_the_rule(db, clock, settings, captioner, job_id):
    # The CT's study description, matched by a pattern that backtracks without end on it.
    rules = routing.parse("[[rules]]\nname = 'slow'\nstudy_description = '(a|aa)+$'\n", source="slow.toml")
    with db.session() as s:
        s.execute(update(Study).values(study_description="a" * 60 + "!"))
    assert runner(db, clock).run(job_id, drafter_with(db, clock, captioner, settings, rules).draft) == "failed"
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.attempts == 1 and job.error.startswith(
            "routing rules: slow.toml: rule 'slow': study_description: /(a|aa)+$/ took longer"
        )
        assert s.scalars(select(RoutingDecision)).all() == []


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_two_model_names_for_the_same_weights_make_one_sr(db, listener, clock, assembler, settings, captioner, tmp_path, tiny_model):
    mr_series = two_series_study(listener, tmp_path)
    clock.advance(settings.quiet_seconds + 1)
    (job_id,) = assembler.tick()
    rules = routing.parse(
        f"[models]\nsame = '{tiny_model}'\n[[rules]]\nname = 'mr'\nmodality = 'MR'\nmodel = 'same'\n[[rules]]\nname = 'ct'\n"
    )
    drafter = drafter_with(db, clock, captioner, settings, rules, models=lambda name: captioner)
    assert runner(db, clock).run(job_id, drafter.draft) == "succeeded"
    with db.session() as s:
        (doc,) = s.scalars(select(SRDocument)).all()
        assert {d.series_uid for d in s.scalars(select(Draft).where(Draft.sr_document_id == doc.id))} == {CT_SERIES, mr_series}
