"""The OHIF viewer at /viewer/ in a real browser (headless Debian chromium): the study list
shows the stored study; opening it renders pixels and lists the synthetic series with its
label. Skipped when the viewer is not installed (scripts/setup fetches it when npm exists)."""
from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.support.dicomweb import client
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


def test_ohif_lists_and_renders_original_and_synthetic(web_factory: Any,
                                                       tmp_path: Path) -> None:
    web = web_factory(anonymous_scopes=["read"])
    _viewer_installed(web)
    series = make_series(8, 64, 64)
    synthetic = make_series(8, 64, 64, study_uid=str(series[0].StudyInstanceUID), seed=3)
    for ds in synthetic:
        ds.SyntheticData = "YES"
        ds.SeriesDescription = "SYNTHETIC denoise"
    client(web.url).store_instances(series + synthetic)

    listing = _text(_chromium("--dump-dom", web.url + "/viewer/").stdout)
    assert "Study List" in listing and "Phantom, Test" in listing, listing[-2000:]

    study = web.url + f"/viewer/viewer?StudyInstanceUIDs={series[0].StudyInstanceUID}"
    page = _text(_chromium("--dump-dom", study).stdout)
    assert "SYNTHETIC denoise" in page and "CT phantom" in page
    shot = tmp_path / "viewer.png"
    _chromium(f"--screenshot={shot}", study)
    img = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"), dtype=float)
    # the viewport (right of the series panel, below the toolbar) shows the phantom: a
    # bright ring around a grey disc on black, not a blank canvas
    view = img[150:650, 450:1100]
    assert view.std() > 30 and (view > 200).mean() > 0.02 and (view < 30).mean() > 0.05
