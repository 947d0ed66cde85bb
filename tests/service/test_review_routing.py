"""The verified report follows its draft's routing: a rule's destinations, or the configured ones."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from service import routing
from service.review import Reviews
from service.schema import Dispatch, Output, SRDocument
from service.users import Users
from tests.pipeline import runner
from workers.drafting import Drafter, DraftOptions

CONFIGURED = "ORTHANC@127.0.0.1:4242"


def approve_draft(db, clock, settings, captioner, job_id, rules: routing.RuleSet) -> dict[str, list[str]]:
    """Draft the job under ``rules`` and approve it: the destinations of the draft and of the verified SR."""
    options = DraftOptions(destinations=(CONFIGURED,), storage=settings.storage, routing=rules)
    assert runner(db, clock).run(job_id, Drafter(db, clock, captioner, options, "worker:test").draft) == "succeeded"
    with db.session() as s:
        draft_id = s.scalar(select(SRDocument.id).where(SRDocument.job_id == job_id))
    smith = Users(db, clock).add("smith", "Smith^Jane", "radiologist", "correct horse battery", "cli:test")
    reviews = Reviews(db, clock, storage=settings.storage, destinations=[CONFIGURED], organization="General Hospital")
    reviews.approve(draft_id, smith)
    with db.session() as s:
        rows = s.execute(
            select(SRDocument.kind, Dispatch.destination)
            .join(Output, Output.report_id == SRDocument.id)
            .join(Dispatch, Dispatch.output_id == Output.id)
            .order_by(Dispatch.id)
        ).all()
    found: dict[str, list[str]] = {"draft": [], "verified": []}
    for kind, destination in rows:
        found[kind].append(destination)
    return found


@pytest.mark.peers
def test_a_rules_destinations_take_the_verified_report_there_too(db, clock, settings, captioner, job_id):
    rules = routing.parse(
        "[[rules]]\nname = 'heads'\nmodality = 'CT'\ndestinations = ['HEADPACS@127.0.0.1:4243', 'ARCHIVE@127.0.0.1:4244']\n"
    )
    assert approve_draft(db, clock, settings, captioner, job_id, rules) == {
        "draft": ["HEADPACS@127.0.0.1:4243", "ARCHIVE@127.0.0.1:4244"],
        "verified": ["HEADPACS@127.0.0.1:4243", "ARCHIVE@127.0.0.1:4244"],
    }


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_without_rule_destinations_both_go_to_the_configured_ones(db, clock, settings, captioner, job_id):
    assert approve_draft(db, clock, settings, captioner, job_id, routing.default()) == {"draft": [CONFIGURED], "verified": [CONFIGURED]}


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_rule_that_keeps_the_draft_local_keeps_the_verified_report_local(db, clock, settings, captioner, job_id):
    rules = routing.parse("[[rules]]\nname = 'local'\ndestinations = []\n")
    assert approve_draft(db, clock, settings, captioner, job_id, rules) == {"draft": [], "verified": []}


@pytest.mark.peers
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_draft_from_before_routing_rules_sends_its_verified_report_to_the_configured_ones(
    db, clock, settings, captioner, job_id, monkeypatch
):
    from sqlalchemy import delete

    from service.schema import RoutingDecision

    rules = routing.parse("[[rules]]\nname = 'heads'\ndestinations = ['HEADPACS@127.0.0.1:4243']\n")
    real_record = routing.record

    def before_routing(s, *args, **kwargs):  # a draft written before migration 0010: no decisions recorded
        real_record(s, *args, **kwargs)
        s.execute(delete(RoutingDecision))

    monkeypatch.setattr(routing, "record", before_routing)
    assert approve_draft(db, clock, settings, captioner, job_id, rules) == {"draft": ["HEADPACS@127.0.0.1:4243"], "verified": [CONFIGURED]}
