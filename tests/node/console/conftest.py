"""Reuse the DICOMweb fixtures (``web``: a running node with DIMSE and HTTP); ``browser``:
Debian's headless chromium driven through chromedriver (selenium; nothing downloaded)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.node.dicomweb.conftest import web, web_factory  # noqa: F401
from tests.support.net import require_tool


@pytest.fixture
def browser() -> Iterator[Any]:
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager fetch anything
    driver_path = require_tool("chromedriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = require_tool("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,900"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    d.implicitly_wait(5)
    yield d
    d.quit()
