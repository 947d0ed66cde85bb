"""The review page in headless Chromium (issue 15): scroll the stack with the wheel, the keys and the slider,
window it by dragging and by presets, jump to a key image, then read and decide with the keyboard only —
edit, see the diff, approve with its confirmation, reject with a reason — while the worklist moves on.

The app runs in this process (uvicorn in a thread) on the test database with real DICOM and a draft
from the tiny model; the browser talks to it over plain HTTP on localhost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pydicom
import pytest
import uvicorn
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select

from dicom_io.sample_study import write_sample
from dicom_io.sr import read_findings, read_impression
from service.schema import Review, SRDocument
from service.web.app import create_app
from tests.conftest import free_port
from tests.pipeline import draft_study
from tests.service.web import test_browser
from tests.service.web.conftest import PASSWORD
from tests.service.web.test_browser import illustrate_drafts, screenshot

chromium = test_browser.chromium  # the same headless Chromium fixture
pytestmark = [pytest.mark.peers, pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]
EDITED = "No acute intracranial haemorrhage. Ventricles normal in size."
IMPRESSION = "No acute intracranial abnormality."


@pytest.fixture
def web(db, clock, settings) -> Iterator[str]:
    """The web app on a free port of 127.0.0.1; its base URL on localhost (a secure context for the Secure cookie)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, db, clock), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the web app did not start"
        time.sleep(0.05)
    yield f"http://localhost:{port}"
    server.should_exit = True
    thread.join(10)


def state(driver, selector: str = ".stack") -> dict[str, str]:
    return driver.execute_script(f"return Object.assign({{}}, document.querySelector('{selector}').dataset)")


def shown(driver) -> bool:
    """The slice the viewer wants is the one drawn, and the canvas is not black."""
    return driver.execute_script(
        """const root = document.querySelector('.stack'), stack = window.MedCapStacks && window.MedCapStacks.all[0];
        if (!root || !stack || !stack.meta || !root.dataset.shown || stack.wanted !== root.dataset.shown) return false;
        const c = root.querySelector('canvas'), px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let lit = 0; for (let i = 0; i < px.length; i += 4 * 97) if (px[i] > 20) lit++;
        return lit > 50;"""
    )


@pytest.fixture
def sample_drafts(db, clock, settings, listener, assembler, captioner, tmp_path) -> tuple[int, int]:
    """`medcap sample`'s head CT drafted, and an hour later its brain MR (the same patient): no shared data needed."""
    sample = write_sample(tmp_path / "sample")
    ct = draft_study(db, clock, settings, listener, assembler, captioner, sample["ct-head"])
    clock.advance(3600)
    mr = draft_study(db, clock, settings, listener, assembler, captioner, sample["mr-brain"])
    clock.advance(2 * 3600 + 600)  # they have waited a while when the radiologist comes
    illustrate_drafts(db)  # the screenshots show drafts that read like reports
    return ct, mr


def test_scroll_window_and_decide_with_the_keyboard(web, chromium, accounts, sample_drafts, db, tmp_path):
    driver, base = chromium, web
    draft_id, second = sample_drafts
    wait = WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException, NoSuchElementException))  # mid-navigation
    driver.get(f"{base}/login?next=/worklist")
    driver.find_element(By.ID, "username").send_keys("smith")
    driver.find_element(By.ID, "password").send_keys(PASSWORD + Keys.ENTER)
    wait.until(lambda d: d.current_url == f"{base}/worklist")
    screenshot(driver, "worklist-reading", tmp_path)

    # Start reading: the oldest draft, its stack at the first key image.
    driver.find_element(By.ID, "start-reading").click()
    wait.until(lambda d: d.current_url == f"{base}/drafts/{draft_id}")
    wait.until(shown)
    stack = driver.execute_script("return window.MedCapStacks.all[0].meta")
    first_key = stack["keys"][0]["index"]
    assert state(driver)["index"] == str(first_key) and state(driver)["count"] == str(stack["count"]) == "24"
    info = driver.find_element(By.CSS_SELECTOR, ".stack-info").text
    assert info.startswith(f"Slice {first_key + 1} / 24 · ") and " mm" in info and "Key image 1" in info

    # Scroll: arrow keys, the wheel, End/Home, the slider.
    body = driver.find_element(By.TAG_NAME, "body")
    start = int(state(driver)["index"])
    target = start + 1 if start < 23 else start - 1
    body.send_keys(Keys.ARROW_DOWN if target > start else Keys.ARROW_UP)
    wait.until(lambda d: state(d)["index"] == str(target) and shown(d))
    assert f"/slices/{target}.png?c=40.0&w=80.0" in state(driver)["shown"]
    canvas = driver.find_element(By.CSS_SELECTOR, ".stack canvas")
    body.send_keys(Keys.HOME)
    wait.until(lambda d: state(d)["index"] == "0" and shown(d))
    ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, 120).perform()
    wait.until(lambda d: state(d)["index"] == "1" and shown(d))
    body.send_keys(Keys.END)
    wait.until(lambda d: state(d)["index"] == "23" and shown(d))
    assert driver.find_element(By.CSS_SELECTOR, ".stack-info").text.startswith("Slice 24 / 24")
    driver.execute_script("const s = document.querySelector('.stack-slider'); s.value = 3; s.dispatchEvent(new Event('input'))")
    wait.until(lambda d: state(d)["index"] == "3" and shown(d))

    # Window: drag right (wider) and down (lower level), then the bone preset by its key, then reset.
    ActionChains(driver).move_to_element(canvas).click_and_hold().move_by_offset(64, 32).release().perform()
    wait.until(lambda d: float(state(d)["width"]) > 80 and float(state(d)["center"]) < 40 and shown(d))
    dragged = state(driver)
    assert f"c={dragged['center']}&w={dragged['width']}" in dragged["shown"]
    body.send_keys("5")  # default, brain, subdural, stroke, bone
    wait.until(lambda d: (state(d)["center"], state(d)["width"]) == ("400.0", "1800.0") and shown(d))
    assert "current" in driver.find_element(By.CSS_SELECTOR, 'button[data-preset="bone"]').get_attribute("class")
    body.send_keys("+")
    wait.until(lambda d: state(d)["zoom"] == "1.25")
    body.send_keys("0")
    wait.until(lambda d: (state(d)["center"], state(d)["zoom"]) == ("40.0", "1.00") and shown(d))

    # A key image is one click away: its thumbnail beside the text, or its button under the stack.
    last_key = stack["keys"][-1]["index"]
    driver.find_elements(By.CSS_SELECTOR, ".key-thumb")[-1].click()
    wait.until(lambda d: state(d)["index"] == str(last_key) and shown(d))
    body.send_keys(Keys.HOME)
    wait.until(lambda d: state(d)["index"] == "0")
    body.send_keys("k")
    wait.until(lambda d: state(d)["index"] == str(first_key))

    # n and p walk the reading order (the MR waits next), ? shows the keys.
    body.send_keys("n")
    wait.until(lambda d: d.current_url == f"{base}/drafts/{second}" and shown(d))
    driver.find_element(By.TAG_NAME, "body").send_keys("p")
    wait.until(lambda d: d.current_url == f"{base}/drafts/{draft_id}" and shown(d))
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys("?")
    wait.until(lambda d: d.find_element(By.ID, "keys").get_attribute("open") is not None)
    assert "approve and sign" in driver.find_element(By.ID, "keys").text

    # Read and decide with the keyboard: e edits, Esc returns to the images, a asks, Enter signs.
    body.send_keys("?")
    body.send_keys("e")
    finding = driver.switch_to.active_element
    assert finding.get_attribute("name").startswith("finding:")
    finding.send_keys(Keys.CONTROL, "a")
    finding.send_keys(EDITED)
    live = driver.find_element(By.CSS_SELECTOR, ".live-diff")
    wait.until(lambda d: "haemorrhage." in "".join(e.text for e in live.find_elements(By.TAG_NAME, "ins")))
    impression = driver.find_element(By.ID, "impression")  # Tab would do; the impression too reads as a report
    impression.send_keys(Keys.CONTROL, "a")
    impression.send_keys(IMPRESSION)
    finding.click()
    finding.send_keys(Keys.ESCAPE)
    assert "stack" in driver.switch_to.active_element.get_attribute("class")
    driver.switch_to.active_element.send_keys(Keys.ARROW_DOWN)  # the images answer the keys again
    wait.until(lambda d: state(d)["index"] == str(min(first_key + 1, 23)))
    screenshot(driver, "review-stack", tmp_path)
    driver.switch_to.active_element.send_keys("a")
    dialog = driver.find_element(By.ID, "confirm-dialog")
    wait.until(lambda d: dialog.get_attribute("open") is not None)
    assert "You changed 2 of 2 texts" in driver.find_element(By.ID, "confirm-changes").text
    driver.switch_to.active_element.send_keys(Keys.ESCAPE)  # not yet
    wait.until(lambda d: dialog.get_attribute("open") is None)
    with db.session() as s:
        assert s.scalars(select(Review)).all() == []
    body.send_keys("a")
    wait.until(lambda d: dialog.get_attribute("open") is not None)
    driver.switch_to.active_element.send_keys(Keys.ENTER)

    # Signed; the worklist moved on to the next draft.
    wait.until(lambda d: d.current_url.startswith(f"{base}/drafts/{second}?notice=approved"))
    assert driver.find_element(By.CSS_SELECTOR, "p.notice").text.startswith(f"Approved draft {draft_id}.")
    with db.session() as s:
        verified = s.scalars(select(SRDocument).where(SRDocument.kind == "verified")).one()
    signed = pydicom.dcmread(verified.path)
    assert [f.text for f in read_findings(signed)] == [EDITED] and read_impression(signed) == IMPRESSION

    # The MR: auto-windowed, and the patient's CT, just approved, among the earlier reports.
    wait.until(shown)
    assert driver.execute_script("return Object.keys(window.MedCapStacks.all[0].meta.windows)") == ["default", "auto"]
    earlier = driver.find_element(By.ID, "earlier-reports").text
    assert "CT HEAD WITHOUT CONTRAST (synthetic phantom)" in earlier and "approved" in earlier
    # The approved draft left the reading order; its page shows the final diff.
    assert driver.find_elements(By.ID, "previous-draft") == []  # the approved draft is no longer in the reading order
    driver.get(f"{base}/drafts/{draft_id}")
    final = driver.find_element(By.CSS_SELECTOR, ".final-diff")
    assert "haemorrhage." in "".join(e.text for e in final.find_elements(By.TAG_NAME, "ins"))
    driver.back()
    wait.until(lambda d: d.current_url.startswith(f"{base}/drafts/{second}"))

    # Reject with a reason, keyboard only: r, type, Enter.
    wait.until(shown)
    driver.find_element(By.TAG_NAME, "body").send_keys("r")
    reason = driver.switch_to.active_element
    assert reason.get_attribute("id") == "reject-reason"
    reason.send_keys("Wrong side reported" + Keys.ENTER)
    wait.until(lambda d: "Rejected draft" in d.find_element(By.CSS_SELECTOR, "p.notice").text)
    assert "No more drafts await review." in driver.find_element(By.CSS_SELECTOR, "p.notice").text
    with db.session() as s:
        decisions = {r.draft_sr_id: (r.decision, r.reason) for r in s.scalars(select(Review))}
    assert decisions == {draft_id: ("approved", None), second: ("rejected", "Wrong side reported")}
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]]
    assert errors == [], errors
