"""The OHIF viewer at /viewer/ in a real browser (headless Debian chromium): with anonymous
reads off, the viewer sends the browser to the sign-in page; once signed in, the study list
shows the stored study (QIDO-RS with the token) and opening it renders pixels (WADO-RS with
the token) and lists the synthetic series with its label. Skipped when the viewer is not
installed (scripts/setup fetches it when npm exists)."""
from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.node.console.conftest import browser  # noqa: F401
from tests.support.dicomweb import TOKENS, client
from tests.support.dimse import ledger_events
from tests.support.factory import make_series
from tests.support.net import require_tool


def _viewer_installed(web: Any) -> None:
    from node.dicomweb.app import viewer_dir

    if viewer_dir(web.node.ctx) is None:
        pytest.skip("OHIF viewer not installed: scripts/setup fetches @ohif/app when npm "
                    "is present (into ~/.local/share/synthnode/viewer)")


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    exe = require_tool("chromium")
    return subprocess.run([exe, "--headless=new", "--no-sandbox", "--use-gl=swiftshader",
                           "--enable-unsafe-swiftshader", "--window-size=1280,800",
                           "--virtual-time-budget=60000", *args],
                          capture_output=True, text=True, timeout=240)


def _text(dom: str) -> str:
    t = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", t))


def test_app_config_signs_in_and_hands_the_token_to_ohif(web_factory: Any) -> None:
    import httpx

    from node.dicomweb.viewer import COOKIE

    web = web_factory()  # no anonymous reads
    _viewer_installed(web)
    url = web.url + "/viewer/app-config.js"
    js = httpx.get(url).text  # not signed in: to the sign-in page and back
    assert "window.location.replace" in js and "/console/login?next=" in js
    assert "window.location.replace" in httpx.get(url, cookies={COOKIE: "not-a-token"}).text
    store_only = httpx.get(url, cookies={COOKIE: TOKENS["storer"][0]}).text
    assert "window.location.replace" in store_only  # a token without read: not handed on
    signed = httpx.get(url, cookies={COOKIE: TOKENS["reader"][0]})
    assert signed.headers["cache-control"] == "no-store"
    assert f'"Bearer {TOKENS["reader"][0]}"' in signed.text
    assert "getAuthorizationHeader" in signed.text and web.url in signed.text
    # the DICOMweb routes never take the cookie in place of the header
    r = httpx.get(web.url + "/studies", cookies={COOKIE: TOKENS["reader"][0]})
    assert r.status_code == 401
    # with anonymous reads on, the viewer works without signing in (no token in it)
    anon = web_factory(anonymous_scopes=["read"])
    js = httpx.get(anon.url + "/viewer/app-config.js").text
    assert js.startswith("window.config = {") and "Bearer" not in js


def test_ohif_signs_in_lists_and_renders_original_and_synthetic(
        web_factory: Any, browser: Any, tmp_path: Path) -> None:  # noqa: F811
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    web = web_factory()  # anonymous reads off: every viewer request needs the token
    _viewer_installed(web)
    series = make_series(8, 64, 64)
    synthetic = make_series(8, 64, 64, study_uid=str(series[0].StudyInstanceUID), seed=3)
    for ds in synthetic:
        ds.SyntheticData = "YES"
        ds.SeriesDescription = "SYNTHETIC denoise"
    client(web.url).store_instances(series + synthetic)

    d = browser
    d.set_window_size(1280, 800)
    d.get(web.url + "/viewer/")
    WebDriverWait(d, 60).until(lambda drv: "/console/login" in drv.current_url)
    token = d.switch_to.active_element
    assert token.get_attribute("id") == "token"
    token.send_keys(TOKENS["reader"][0] + Keys.ENTER)
    WebDriverWait(d, 60).until(lambda drv: drv.current_url.rstrip("/").endswith("/viewer"))

    def text() -> str:
        return _text(d.page_source)

    WebDriverWait(d, 120).until(lambda drv: "Phantom, Test" in text())
    assert "Study List" in text()

    d.get(web.url + f"/viewer/viewer?StudyInstanceUIDs={series[0].StudyInstanceUID}")
    WebDriverWait(d, 120).until(lambda drv: "SYNTHETIC denoise" in text())
    assert "CT phantom" in text()
    shot = tmp_path / "viewer.png"

    def rendered(drv: Any) -> bool:
        drv.save_screenshot(str(shot))
        img = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"), dtype=float)
        # the viewport (right of the series panel, below the toolbar) shows the phantom: a
        # bright ring around a grey disc on black, not a blank canvas
        view = img[150:650, 450:1100]
        return bool(view.std() > 30 and (view > 200).mean() > 0.02
                    and (view < 30).mean() > 0.05)

    WebDriverWait(d, 120, poll_frequency=2).until(rendered)
    # the reads were the signed-in token's, recorded in the ledger
    web.flush()
    actors = {e.actor for e in ledger_events(web.node, "dicomweb.access")}
    assert "token:reader" in actors, actors
