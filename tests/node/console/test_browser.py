"""The console in a real browser: Debian's headless chromium driven through chromedriver
(selenium; nothing is downloaded). Sign in with the keyboard, read the dashboard's numbers
against what DCMTK storescu sent, open a study (its thumbnail is decoded by the browser),
cancel a job as admin. ``SYNTHNODE_SCREENSHOTS=DIR`` saves a screenshot of each page
(docs/img/ holds those of the docs)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.node.console.test_console import _send
from tests.support.dicomweb import TOKENS
from tests.support.dimse import ledger_events


def _shot(d: Any, name: str) -> None:
    out = os.environ.get("SYNTHNODE_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(Path(out) / f"console-{name}.png"))


def _value(d: Any, label: str) -> str:
    from selenium.webdriver.common.by import By

    row = d.find_element(By.CSS_SELECTOR, f'tr[data-key="{label}"] td.value')
    return str(row.text).strip()


def test_console_in_chromium(web: Any, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from node.pipeline.jobs import JobStore

    sent = _send(web)
    ctx = web.node.ctx
    store = JobStore(ctx.engine, ctx.ledger)
    job_id = store.enqueue("dispatch", study_uid=str(sent[0].StudyInstanceUID),
                           series_uid=str(sent[0].SeriesInstanceUID),
                           spec={"destination": "ORTHANC"})
    d = browser
    d.get(web.url + "/console/")
    assert "/console/login" in d.current_url  # not signed in: the login page
    _shot(d, "login")
    token = d.switch_to.active_element  # the token field has the focus (autofocus)
    assert token.get_attribute("id") == "token"
    token.send_keys(TOKENS["admin"][0] + Keys.ENTER)  # keyboard only
    # the form posts and redirects: wait for the dashboard, not the first poll
    WebDriverWait(d, 30).until(lambda drv: drv.current_url.endswith("/console/"))
    assert _value(d, "C-STORE instances received since start") == str(len(sent))
    assert _value(d, "instances stored") == str(len(sent))
    assert _value(d, "readiness") == "ready"
    assert _value(d, "queue depth by job state") == "queued: 1"
    _shot(d, "dashboard")

    d.find_element(By.LINK_TEXT, "Studies").click()
    rows = d.find_elements(By.CSS_SELECTOR, "#studies tbody tr")
    assert len(rows) == len({str(s.StudyInstanceUID) for s in sent})
    _shot(d, "studies")
    d.get(f"{web.url}/console/studies/{sent[0].StudyInstanceUID}")
    img = d.find_element(By.CSS_SELECTOR, "#series img")

    # the node rendered it, the browser decoded it (waits while it loads; fails after 30 s)
    WebDriverWait(d, 30).until(lambda drv: drv.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0", img))
    assert img.get_attribute("alt").startswith("thumbnail of series")
    _shot(d, "study")

    d.get(f"{web.url}/console/jobs/{job_id}")
    reason = d.find_element(By.ID, "reason-cancel")
    reason.send_keys("sent to the wrong PACS" + Keys.ENTER)
    assert d.find_element(By.ID, "job-state").text == "cancelled"
    _shot(d, "job")
    ev = [e for e in ledger_events(web.node, "job.cancelled") if e.actor == "token:admin"]
    assert [e.payload["reason"] for e in ev] == ["sent to the wrong PACS"]

    d.get(f"{web.url}/console/audit?uid={sent[0].StudyInstanceUID}")
    assert d.find_elements(By.CSS_SELECTOR, "#entries tbody tr")
    _shot(d, "audit")
    # runs in the background: the page shows its progress (the node's verification held at
    # its first step here, so the browser sees it) and reloads itself when done
    import threading

    from audit.verify import verify_database

    gate, seen = threading.Event(), []

    def held(*args: Any, progress: Any, **kw: Any) -> Any:
        def slow(phase: str, done: int, total: int) -> None:
            progress(phase, done, total)
            seen.append(done)
            gate.wait(30)
        return verify_database(*args, **{**kw, "progress": slow})

    runs = web.node.dicomweb.app.state.verifications
    runs.verify = held
    try:
        d.find_element(By.ID, "verify").click()
        bar = d.find_element(By.ID, "verify-bar")
        assert bar.is_displayed() and not d.find_elements(By.ID, "verify-result")
        assert "entries checked" in d.find_element(By.ID, "verify-phase").text
        _shot(d, "verify-progress")
    finally:
        gate.set()
    WebDriverWait(d, 60).until(lambda drv: drv.find_elements(By.ID, "verify-result"))
    runs.verify = verify_database
    assert d.find_element(By.ID, "verify-result").text.startswith("Verified")
    _shot(d, "verify")
    d.get(f"{web.url}/console/audit/lineage?uid={sent[0].StudyInstanceUID}")
    assert str(sent[0].SeriesInstanceUID) in d.find_element(By.ID, "lineage").text
    graph = d.find_element(By.ID, "lineage-graph")  # drawn by the node, shown by the browser
    assert graph.is_displayed()
    src = d.find_element(By.CSS_SELECTOR, '#lineage-graph [data-kind="source series"]')
    assert src.is_displayed() and "1 instance(s) from" in src.text
    assert "1 instance(s) from ae:STORESCU" in src.get_attribute("aria-label")
    # keyboard: Tab reaches the graph's links (after the form), Enter follows one
    d.find_element(By.ID, "f-uid").click()
    for _ in range(10):
        d.switch_to.active_element.send_keys(Keys.TAB)
        if d.switch_to.active_element.get_attribute("data-kind") == "source series":
            break
    focused = d.switch_to.active_element
    assert focused.get_attribute("data-kind") == "source series"
    focused.send_keys(Keys.ENTER)
    WebDriverWait(d, 30).until(lambda drv: "/console/studies/" in drv.current_url)
    d.get(f"{web.url}/console/models")
    _shot(d, "models")

    from tests.node.console.test_watermark_page import marked_png

    png, _plain, _payload = marked_png(ctx)
    upload = tmp_path / "synthetic-slice.png"
    upload.write_bytes(png)
    d.get(f"{web.url}/console/watermark")
    d.find_element(By.ID, "file").send_keys(str(upload))
    d.find_element(By.ID, "check").click()
    assert d.find_element(By.ID, "wm-result").text.startswith("MARKED")
    assert "1.2.826.0.1.3680043.8.498.2" in d.find_element(By.ID, "wm-ledger").text
    _shot(d, "watermark")
