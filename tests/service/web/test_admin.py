"""The admin pages and /api/admin over HTTP on the real database: failed work with Retry and Resend, the audit
trail with its CSV export, statistics per model version, user management; and nobody but admins gets in."""

from __future__ import annotations

import csv
import io
import re
from datetime import timedelta
from html import unescape

import pytest
from sqlalchemy import select

from service import audit
from service.audit import Action
from service.outputs import DicomSR, OutputKinds
from service.review import Reviews
from service.schema import AuditEvent, Dispatch, Job, Output, SRDocument
from service.users import Users
from tests.conftest import series_files, storescu
from tests.migrations.audit_data import T0, populate
from tests.pipeline import runner
from tests.service.web.conftest import PASSWORD, sign_in
from workers.dispatching import DispatchRunner
from workers.drafting import PermanentJobError

ADMIN_PAGES = ["/admin", "/admin/audit", "/admin/audit.csv", "/admin/stats", "/admin/users"]
DESTINATION = "PACS@127.0.0.1:11112"


def events(db, action: str) -> list[AuditEvent]:
    with db.session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)))


def forms(page: str) -> dict[str, dict[str, str]]:
    """action -> hidden fields of each POST form on the page."""
    found = {}
    for action, body in re.findall(r'<form method="post" action="([^"]+)"[^>]*>(.*?)</form>', page, flags=re.S):
        found[unescape(action)] = {n: unescape(v) for n, v in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', body)}
    return found


def test_only_admins_get_in(client, accounts):
    for path in ADMIN_PAGES:
        assert client.get(path).status_code == 303, "not signed in: to the sign-in page"
    assert client.get("/api/admin/overview").status_code == 401
    csrf = sign_in(client, "smith")
    for path in ADMIN_PAGES + ["/api/admin/overview", "/api/admin/audit", "/api/admin/stats", "/api/admin/users", "/api/admin/failed"]:
        response = client.get(path)
        assert response.status_code == 403, path
    for path in ["/admin/jobs/1/retry", "/admin/reports/1.2.3/resend", "/admin/users", "/admin/users/jones/disable"]:
        assert client.post(path, data={"csrf_token": csrf}).status_code == 403, path
    for path in ["/api/admin/jobs/1/retry", "/api/admin/users/jones/disable"]:
        assert client.post(path, headers={"X-CSRF-Token": csrf}).status_code == 403, path
    assert client.get("/api/admin/audit").json() == {"detail": "this needs the admin role"}


@pytest.mark.peers
def test_failed_work_is_retried_and_resent_from_the_overview(client, accounts, db, clock, settings, listener, assembler, draft_id):
    # Real failed work: the approved draft's verified SR is refused on its way out; late images make a version whose job fails.
    reviews = Reviews(db, clock, storage=settings.storage, destinations=[DESTINATION], organization="General Hospital")
    reviews.approve(draft_id, accounts["radiologist"])
    with db.session() as s:
        verified = s.scalars(select(SRDocument).where(SRDocument.predecessor_id == draft_id)).one()
        dispatch_id = s.scalar(select(Dispatch.id).join(Output).where(Output.report_id == verified.id))

    def refuse(destination: str) -> object:
        raise ValueError("no such host")

    dispatcher = DispatchRunner(
        db,
        clock,
        "worker:test",
        kinds=OutputKinds([DicomSR(refuse, lambda d, p: pytest.fail("must not send"))]),
        max_attempts=1,
        retry_delay=lambda n: 1.0,
        stale_seconds=60,
    )
    assert dispatcher.run(dispatch_id) == "failed"
    assert storescu(listener, series_files("ct-head-ge")[8:10]).returncode == 0
    clock.advance(settings.quiet_seconds + 1)
    (job_id,) = assembler.tick()

    def unreadable(job: int) -> str:
        raise PermanentJobError("unreadable pixel data")

    assert runner(db, clock).run(job_id, unreadable) == "failed"

    csrf = sign_in(client, "root")
    page = client.get("/admin")
    assert page.status_code == 200
    assert re.search(r'data-count="failed_jobs">1<', page.text) and re.search(r'data-count="failed_dispatches">1<', page.text)
    assert re.search(r'data-count="approved">1<', page.text) and "unreadable pixel data" in page.text and "no such host" in page.text
    buttons = forms(page.text)
    assert buttons[f"/admin/jobs/{job_id}/retry"] == {"csrf_token": csrf}
    assert buttons[f"/admin/reports/{verified.sop_instance_uid}/resend"] == {"csrf_token": csrf, "destination": DESTINATION}

    assert client.post(f"/admin/jobs/{job_id}/retry", data={}).status_code == 403, "no CSRF token"
    published = len(events(db, "job.enqueued")) + len(events(db, "job.reenqueued"))
    retried = client.post(f"/admin/jobs/{job_id}/retry", data=buttons[f"/admin/jobs/{job_id}/retry"])
    assert retried.status_code == 303 and retried.headers["location"].startswith("/admin?notice=job_retried")
    assert f"Job {job_id} is queued again." in client.get(retried.headers["location"]).text
    with db.session() as s:
        job = s.get(Job, job_id)
    assert (job.status, job.attempts) == ("queued", 0)
    assert len(events(db, "job.enqueued")) + len(events(db, "job.reenqueued")) == published, (
        "queued for the assembler to publish, nothing more"
    )
    (requested,) = events(db, "job.retry_requested")
    assert (requested.actor, requested.object_id, requested.details["previous_error"]) == (
        "user:root",
        str(job_id),
        "unreadable pixel data",
    )
    again = client.post(f"/admin/jobs/{job_id}/retry", data=buttons[f"/admin/jobs/{job_id}/retry"])
    assert again.status_code == 409 and "only failed jobs are retried" in again.text

    elsewhere = client.post(
        f"/admin/reports/{verified.sop_instance_uid}/resend", data={"csrf_token": csrf, "destination": "EVIL@10.6.6.6:104"}
    )
    assert elsewhere.status_code == 409 and "neither a destination of SR" in unescape(elsewhere.text)
    resent = client.post(
        f"/admin/reports/{verified.sop_instance_uid}/resend", data=buttons[f"/admin/reports/{verified.sop_instance_uid}/resend"]
    )
    assert resent.status_code == 303
    with db.session() as s:
        dispatches = s.scalars(select(Dispatch).join(Output).where(Output.report_id == verified.id)).all()
    assert [(d.id, d.destination, d.status, d.attempts) for d in dispatches] == [(dispatch_id, DESTINATION, "pending", 0)]
    (resend,) = events(db, "dispatch.resend_requested")
    assert (resend.actor, resend.details["destination"], resend.details["sr"]) == ("user:root", DESTINATION, verified.sop_instance_uid)
    after = client.get("/admin")
    assert "Nothing has failed." in after.text and re.search(r'data-count="failed_jobs">0<', after.text)


def test_the_audit_trail_page_and_its_csv_export(client, accounts, db, clock):
    with db.session() as s:
        for n in range(130):
            audit.record(s, clock.now() + timedelta(seconds=n), "system:listener", Action.LISTENER_STARTED, "listener", f"l{n}")
        audit.record(s, clock.now(), "dicom:=cmd@10.9.9.9", Action.ASSOCIATION_REJECTED, "association", "=1+2")
    sign_in(client, "root")
    page = client.get("/admin/audit", params={"action": "listener.started"})
    assert page.status_code == 200
    shown = re.findall(r'<td class="action">([^<]+)</td>', page.text)
    assert shown == ["listener.started"] * 100 and "l129" in page.text and "l29" not in page.text.replace("l129", "")
    older = re.search(r'href="\?([^"]+)" id="older"', page.text).group(1)
    second = client.get("/admin/audit?" + unescape(older))
    assert re.findall(r'<td class="action">([^<]+)</td>', second.text) == ["listener.started"] * 30 and 'id="older"' not in second.text
    (searched, searched_again) = events(db, "audit.searched")
    assert (searched.actor, searched.details["filters"], searched.details["shown"]) == ("user:root", {"action": "listener.started"}, 100)
    assert searched_again.details["page"] == 2

    by_user = client.get("/admin/audit", params={"user": "root", "action": "auth."})
    assert re.findall(r'<td class="action">([^<]+)</td>', by_user.text) == ["auth.login"]
    bad = client.get("/admin/audit", params={"since": "last week"})
    assert bad.status_code == 400 and "is not a date" in unescape(bad.text)

    export = client.get("/admin/audit.csv", params={"action": "association.rejected"})
    assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
    assert export.headers["content-disposition"].startswith('attachment; filename="medcap-audit-')
    table = list(csv.reader(io.StringIO(export.text)))
    assert table[0][:4] == ["id", "at", "actor", "action"] and len(table) == 2
    assert (table[1][2], table[1][3], table[1][5]) == ("dicom:=cmd@10.9.9.9", "association.rejected", "'=1+2")
    everything = list(csv.reader(io.StringIO(client.get("/admin/audit.csv").text)))
    assert len(everything) > 135 and "X-MedCap-Truncated" not in export.headers
    exported = events(db, "audit.exported")
    assert [(e.actor, e.details["rows"]) for e in exported] == [("user:root", 1), ("user:root", len(everything) - 1)]


def test_statistics_per_model_version(client, accounts, db, clock):
    populate(db)  # two model versions with exactly known times and edits (tests/migrations/audit_data.py)
    clock.advance((T0 - clock.now()).total_seconds() + 40 * 86400)  # 40 days after the history
    sign_in(client, "root")
    page = client.get("/admin/stats", params={"days": "all"})
    assert page.status_code == 200
    row_a = re.search(r'<tr data-model="msmedcap 1.0">(.*?)</tr>', page.text, flags=re.S).group(1)
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row_a, flags=re.S)]
    assert cells[2:] == ["3", "2", "2.0 min / 3.0 min", "10.0 min / 20.0 min", "11.0 min / 22.0 min"]
    quality_a = re.findall(r'<tr data-model="msmedcap 1.0">(.*?)</tr>', page.text, flags=re.S)[1]
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", quality_a, flags=re.S)]
    assert cells[2:] == ["4", "3", "2", "1", "1 (33.3 %)", "10.0 / 0", "10.0 %"]
    recent = client.get("/admin/stats")  # the last 30 days: nothing
    assert recent.text.count("No drafts in this period.") == 2

    stats = client.get("/api/admin/stats", params={"since": "2026-01-05", "until": "2026-01-05"}).json()
    assert stats["since"].startswith("2026-01-05T00:00:00") and stats["until"].startswith("2026-01-06T00:00:00")
    assert [(t["model_version"], t["studies"], t["approval_median_seconds"], t["total_p90_seconds"]) for t in stats["turnaround"]] == [
        ("1.0", 3, 600.0, 1320.0),
        ("2.0", 2, 60.0, 300.0),
    ]
    assert [(q["model_version"], q["approved_unchanged_rate"], q["median_edit_distance"]) for q in stats["quality"]] == [
        ("1.0", pytest.approx(1 / 3), 0),
        ("2.0", 0.0, 5),
    ]
    assert client.get("/api/admin/stats", params={"since": "2026-02-01"}).json()["turnaround"] == []
    studies = client.get("/api/admin/turnaround", params={"limit": 2}).json()
    assert [(s["accession_number"], s["draft_seconds"], s["approved_at"]) for s in studies] == [
        ("A1005", 90.0, None),
        ("A1004", 240.0, "2026-01-05T08:55:00Z"),
    ]
    assert client.get("/api/admin/stats", params={"since": "soon"}).status_code == 400


def test_user_management(client, accounts, db, clock):
    csrf = sign_in(client, "root")
    page = client.get("/admin/users")
    assert re.findall(r'<tr data-user="([^"]+)">', page.text) == ["jones", "root", "smith"]
    assert (
        client.post(
            "/admin/users", data={"username": "brown", "display_name": "Brown^Ann", "role": "radiologist", "password": PASSWORD}
        ).status_code
        == 403
    )

    added = client.post(
        "/admin/users",
        data={"csrf_token": csrf, "username": "brown", "display_name": "Brown^Ann", "role": "radiologist", "password": PASSWORD},
    )
    assert added.status_code == 303 and "User brown added as radiologist." in client.get(added.headers["location"]).text
    users = Users(db, clock)
    assert users.authenticate("brown", PASSWORD).display_name == "Brown^Ann"
    (event,) = events(db, "user.added")[-1:]
    assert (event.actor, event.object_id, event.details["role"]) == ("user:root", "brown", "radiologist")

    short = client.post(
        "/admin/users", data={"csrf_token": csrf, "username": "white", "display_name": "White^Bo", "role": "admin", "password": "short pw"}
    )
    assert short.status_code == 400 and "at least 12 characters" in short.text
    assert 'value="White^Bo"' in short.text and "short pw" not in short.text, "the form is kept, the password is not echoed"
    twice = client.post(
        "/admin/users",
        data={"csrf_token": csrf, "username": "brown", "display_name": "Brown^Ann", "role": "radiologist", "password": PASSWORD},
    )
    assert twice.status_code == 400 and "exists already" in unescape(twice.text)

    disabled = client.post("/admin/users/smith/disable", data={"csrf_token": csrf})
    assert disabled.status_code == 303 and users.authenticate("smith", PASSWORD) is None
    assert re.search(r'<tr data-user="smith">.*?<td class="state">disabled</td>', client.get("/admin/users").text, flags=re.S)
    assert client.post("/admin/users/smith/enable", data={"csrf_token": csrf}).status_code == 303
    assert users.authenticate("smith", PASSWORD) is not None
    assert [e.object_id for e in events(db, "user.disabled")] == ["smith"] and [e.actor for e in events(db, "user.enabled")] == [
        "user:root"
    ]

    reset = client.post("/admin/users/jones/password", data={"csrf_token": csrf, "password": "a new long passphrase"})
    assert reset.status_code == 303 and users.authenticate("jones", "a new long passphrase") is not None
    assert users.authenticate("jones", PASSWORD) is None
    weak = client.post("/admin/users/jones/password", data={"csrf_token": csrf, "password": "short"})
    assert weak.status_code == 400 and "at least 12 characters" in weak.text
    nobody = client.post("/admin/users/nobody/disable", data={"csrf_token": csrf})
    assert nobody.status_code == 400 and "there is no user" in unescape(nobody.text)
    myself = client.post("/admin/users/root/disable", data={"csrf_token": csrf})
    assert myself.status_code == 400 and "cannot disable your own account" in myself.text
    assert users.authenticate("root", PASSWORD) is not None


def test_the_admin_json_api(client, accounts, db):
    csrf = sign_in(client, "root")
    headers = {"X-CSRF-Token": csrf}
    overview = client.get("/api/admin/overview").json()
    assert overview["counts"]["active_users"] == 3 and overview["failed"] == []
    found = client.get("/api/admin/audit", params={"user": "root", "action": "auth.login"}).json()
    assert [(e["actor"], e["action"]) for e in found["events"]] == [("user:root", "auth.login")] and found["more"] is False
    assert events(db, "audit.searched")[-1].details["api"] is True
    assert client.get("/api/admin/audit", params={"until": "2026-13-01"}).status_code == 400

    new = {"username": "brown", "display_name": "Brown^Ann", "role": "radiologist", "password": PASSWORD}
    assert client.post("/api/admin/users", json=new).status_code == 403, "no CSRF header"
    created = client.post("/api/admin/users", json=new, headers=headers)
    assert created.status_code == 201 and created.json() == {
        "username": "brown",
        "display_name": "Brown^Ann",
        "role": "radiologist",
        "disabled": False,
    }
    assert client.post("/api/admin/users", json=new, headers=headers).status_code == 409
    assert client.post("/api/admin/users", json={**new, "username": "Bad Name"}, headers=headers).status_code == 400
    assert client.post("/api/admin/users/brown/disable", headers=headers).status_code == 204
    assert {u["username"]: u["disabled"] for u in client.get("/api/admin/users").json()}["brown"] is True
    assert client.post("/api/admin/users/brown/enable", headers=headers).status_code == 204
    assert client.post("/api/admin/users/brown/password", json={"password": "another long passphrase"}, headers=headers).status_code == 204
    assert client.post("/api/admin/users/ghost/password", json={"password": "another long passphrase"}, headers=headers).status_code == 404
    assert client.post("/api/admin/users/root/disable", headers=headers).status_code == 400

    assert client.post("/api/admin/jobs/999/retry", headers=headers).status_code == 404
    missing = client.post("/api/admin/reports/1.2.3.4/resend", json={}, headers=headers)
    assert missing.status_code in (404, 409) and client.get("/api/admin/failed").json() == []
    assert "/api/admin/audit" in client.get("/api/openapi.json").json()["paths"]
