"""A radiologist in a real browser, on the whole pipeline as real processes.

Orthanc pushes the CT study to the embedded default (`medcap serve`: listener, workers and the web
app, SQLite and the embedded broker) with a tiny real model; once the draft SR is back in Orthanc,
a radiologist made with `medcap users add` signs in with headless Chromium (Debian's chromium and
chromium-driver, driven by selenium) over plain HTTP on localhost, opens the worklist and the
draft, sees the banner and the key images, edits the finding and approves. The verified SR must
then reach Orthanc: COMPLETE, VERIFIED, the draft as its predecessor, the edited text inside.

With ``MEDCAP_TEST_SCREENSHOTS=1`` the worklist and review pages are saved to
``docs/screenshots/`` (worklist.png, review.png) for the documentation.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select

from dicom_io.sr import read_findings, read_impression
from service.database import Database
from service.schema import AuditEvent, Dispatch, Draft, SRDocument
from tests.conftest import ORTHANC_AET, Orthanc, delete_srs, free_port, wait_until
from tests.processes import Process, run
from tests.workers.test_processes import FAST, orthanc_srs, pipeline_env, rows, wait_listening

pytestmark = pytest.mark.orthanc

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PASSWORD = "correct horse battery staple"
EDITED = "CT head, axial: no acute intracranial haemorrhage or midline shift. Ventricles normal in size."  # a radiologist's edit
IMPRESSION = "No acute intracranial abnormality."
SCREENSHOTS = Path(__file__).resolve().parents[3] / "docs" / "screenshots"


@pytest.fixture
def chromium() -> Iterator[webdriver.Chrome]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver (scripts/ensure-system does)")
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000", "--lang=en-GB"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def clean_pacs(orthanc: Orthanc) -> Iterator[Orthanc]:
    delete_srs(orthanc)
    yield orthanc
    delete_srs(orthanc)


#: What the drafts say in the pages the tests photograph. The tiny test model writes token noise (the
#: pipeline needs a model, not a good one); the documentation's screenshots should show a draft that
#: reads like a report, so the tests put these in its place, for illustration only, before the pages
#: are opened. Written to match what the headers say (a head CT; a T1 brain MR).
ILLUSTRATIVE_DRAFTS = {
    "CT": (
        "CT head, axial: no acute intracranial haemorrhage, mass effect or midline shift. Ventricles normal in size.",
        "No acute intracranial abnormality identified.",
    ),
    "MR": (
        "MR brain, T1-weighted: normal grey-white matter signal. No mass or abnormal signal. "
        "Ventricles normal in size; midline structures central.",
        "Unremarkable T1-weighted MR brain.",
    ),
}


def illustrate_drafts(db: Database) -> None:
    """Put :data:`ILLUSTRATIVE_DRAFTS` in place of the tiny model's text in every draft (by its series' modality)."""
    with db.session() as s:
        for draft in s.scalars(select(Draft)):
            finding, impression = ILLUSTRATIVE_DRAFTS[draft.modality or "CT"]
            draft.text = finding
            sr = s.get(SRDocument, draft.sr_document_id)
            assert sr is not None
            sr.impression = impression


def screenshot(driver: webdriver.Chrome, name: str, tmp_path: Path) -> None:
    """The whole page as PNG: always beside the test's files, and into docs/screenshots when asked for."""
    driver.execute_script("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0)")
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1280, "height": min(int(metrics["height"]), 4000), "scale": 1},
        },
    )
    png = base64.b64decode(shot["data"])
    (tmp_path / f"{name}.png").write_bytes(png)
    if os.environ.get("MEDCAP_TEST_SCREENSHOTS") == "1":
        try:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            (SCREENSHOTS / f"{name}.png").write_bytes(png)
        except OSError as exc:  # a read-only checkout still runs the test
            print(f"could not save {name}.png to {SCREENSHOTS}: {exc}")


@pytest.mark.processes
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_radiologist_signs_in_reviews_edits_and_approves_in_chromium(
    make_settings, tmp_path, tiny_model, clean_pacs, pacs_studies, chromium
):
    orthanc, driver = clean_pacs, chromium
    study = pacs_studies["ct-head-ge"]
    web_port = free_port()
    settings = make_settings(database_url="", broker_url="", **FAST)  # the embedded default: SQLite and broker under the data dir
    env = pipeline_env(settings, tiny_model, f"{ORTHANC_AET}@127.0.0.1:{orthanc.dicom_port}", MEDCAP_WEB_PORT=str(web_port))
    env.pop("MEDCAP_DATABASE_URL"), env.pop("MEDCAP_BROKER_URL")
    serve = Process(["serve"], env, tmp_path / "serve.log")
    db: Database | None = None
    try:
        wait_listening(serve, settings.dicom_port)
        orthanc.register("medcap", "MEDCAP", settings.dicom_port)
        orthanc.push("medcap", study.orthanc_id)
        db = Database(settings.effective_database_url)
        wait_until(lambda: rows(db, Dispatch.status) == ["delivered"], "the draft SR to reach the PACS", timeout=180)
        with db.session() as s:
            draft = s.scalars(select(SRDocument).where(SRDocument.kind == "draft")).one()
        (in_pacs,) = orthanc_srs(orthanc, study.study_uid)
        assert (in_pacs.SOPInstanceUID, in_pacs.VerificationFlag) == (draft.sop_instance_uid, "UNVERIFIED")
        illustrate_drafts(db)  # the pages below, and their screenshots, show a draft that reads like one

        added = run(["users", "add", "smith", "--role", "radiologist", "--display-name", "Smith^Jane"], env, stdin=PASSWORD + "\n")
        assert added.returncode == 0, added.stderr
        wait_listening(serve, web_port)
        wait_until(lambda: "MedCap is up:" in serve.output(), "serve's start-up line")
        assert f"MedCap is up: DICOM MEDCAP on 127.0.0.1:{settings.dicom_port}, web http://127.0.0.1:{web_port}/" in serve.output()
        base = f"http://localhost:{web_port}"
        wait = WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException, NoSuchElementException))  # mid-navigation

        # Sign in: the worklist sends us to the sign-in page, which sends us back.
        driver.get(f"{base}/worklist")
        assert driver.current_url == f"{base}/login?next=/worklist"
        driver.find_element(By.ID, "username").send_keys("smith")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "sign-in").click()
        wait.until(
            lambda d: d.current_url != f"{base}/login?next=/worklist" and d.execute_script("return document.readyState") == "complete"
        )
        cookie = driver.get_cookie("medcap_session")
        assert cookie is not None, (
            f"Chromium did not keep the Secure session cookie on http://localhost: {driver.get_cookies()}; page: {driver.current_url}"
        )
        assert (cookie["secure"], cookie["httpOnly"], cookie["sameSite"]) == (True, True, "Strict")
        assert driver.current_url == f"{base}/worklist", "the Secure cookie was set but not sent back over http://localhost"
        assert driver.execute_script("return document.cookie") == ""  # HttpOnly: scripts cannot read the session

        # The worklist.
        links = driver.find_elements(By.CSS_SELECTOR, "a.open-draft")
        assert [a.get_attribute("href") for a in links] == [f"{base}/drafts/{draft.id}"]
        assert driver.find_element(By.CSS_SELECTOR, '.count[data-state="awaiting review"]').text == "1"
        assert "Jane Smith" in driver.find_element(By.CSS_SELECTOR, "header .who").text
        screenshot(driver, "worklist", tmp_path)

        # The draft: banner, key images really loaded, the finding edited.
        links[0].click()
        wait.until(lambda d: d.current_url == f"{base}/drafts/{draft.id}" and d.execute_script("return document.readyState") == "complete")
        assert driver.find_element(By.ID, "status-banner").text.startswith("AI draft — preliminary")
        wait.until(lambda d: d.execute_script("return Array.from(document.images).every(i => i.complete)"))
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth, i.naturalHeight])"
        )
        assert len(images) == 3 and all(w > 0 and h > 0 for _, w, h in images), images
        assert all(src.startswith(f"/drafts/{draft.id}/images/") for src, _, _ in images)
        finding = driver.find_element(By.CSS_SELECTOR, "textarea[name^='finding:']")
        drafted = finding.get_attribute("value")
        assert drafted.strip()
        finding.clear()
        finding.send_keys(EDITED)
        impression = driver.find_element(By.ID, "impression")
        impression.clear()
        impression.send_keys(IMPRESSION)
        screenshot(driver, "review", tmp_path)

        driver.find_element(By.ID, "approve").click()
        confirm = driver.find_element(By.ID, "confirm-approve")  # the page asks before signing
        wait.until(lambda d: confirm.is_displayed())
        confirm.click()
        wait.until(lambda d: d.find_element(By.ID, "review-state").text == "approved")
        assert driver.find_element(By.ID, "status-banner").text.startswith("Approved by a radiologist")
        notice = driver.find_element(By.CSS_SELECTOR, "p.notice").text
        assert notice.startswith(f"Approved draft {draft.id}. Verified report ") and "on its way to the PACS" in notice
        assert driver.find_element(By.CSS_SELECTOR, "textarea[name^='finding:']").get_attribute("value") == EDITED
        assert driver.find_elements(By.ID, "approve") == []  # decided: nothing left to approve

        # The verified SR in the PACS.
        with db.session() as s:
            verified = s.scalars(select(SRDocument).where(SRDocument.kind == "verified")).one()
        wait_until(lambda: rows(db, Dispatch.status) == ["delivered", "delivered"], "the verified SR to reach the PACS", timeout=120)
        srs = {sr.SOPInstanceUID: sr for sr in orthanc_srs(orthanc, study.study_uid)}
        assert set(srs) == {draft.sop_instance_uid, verified.sop_instance_uid}
        sr = srs[verified.sop_instance_uid]
        assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "VERIFIED", "FINAL")
        predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert predecessor.ReferencedSOPInstanceUID == draft.sop_instance_uid
        assert [f.text for f in read_findings(sr)] == [EDITED] and read_impression(sr) == IMPRESSION
        assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName) == "Smith^Jane"
        assert srs[draft.sop_instance_uid].VerificationFlag == "UNVERIFIED"  # the draft stays what it was

        # Sign out.
        driver.find_element(By.CSS_SELECTOR, "form.signout button").click()
        wait.until(lambda d: d.current_url == f"{base}/login" and d.execute_script("return document.readyState") == "complete")
        assert driver.get_cookie("medcap_session") is None
        driver.get(f"{base}/drafts/{draft.id}")
        assert driver.current_url == f"{base}/login?next=/drafts/{draft.id}"

        with db.session() as s:
            trail = [
                (e.action, e.details.get("address"))
                for e in s.scalars(select(AuditEvent).where(AuditEvent.actor == "user:smith").order_by(AuditEvent.id))
            ]
        assert [a for a, _ in trail] == [
            "auth.login",
            "worklist.viewed",
            "study.viewed",
            "draft.approved",
            "output.built",
            "dispatch.queued",
            "study.viewed",
            "auth.logout",
        ]
        assert {address for action, address in trail if action not in ("output.built", "dispatch.queued")} == {"127.0.0.1"}
    except WebDriverException as exc:
        pytest.fail(f"the browser failed: {exc.msg}\n{serve.output()[-3000:]}")
    finally:
        if db is not None:
            db.dispose()
        serve.stop()
    assert "Traceback" not in serve.output(), serve.output()[-5000:]
