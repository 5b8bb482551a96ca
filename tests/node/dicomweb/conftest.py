"""Fixtures for DICOMweb tests: ``web`` is a running node (DIMSE + DICOMweb on free loopback
ports) with the tokens of :mod:`tests.support.dicomweb`; ``web.url`` is its DICOMweb root.
``loaded_web`` also holds the instances of :data:`tests.support.dimse.SPECS` (stored via
STOW-RS), on SQLite and on PostgreSQL."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.dicomweb import client, web_overrides
from tests.support.dimse import SPECS, make_dataset, part10


@dataclass
class Web:
    node: Any

    @property
    def url(self) -> str:
        return str(self.node.dicomweb.url)

    def flush(self) -> None:
        self.node.dicomweb.recorder.flush()


@pytest.fixture
def web_factory(start_node: Callable[..., Any]) -> Callable[..., Web]:
    def make(database_url: str | None = None, **dicomweb: Any) -> Web:
        extra = {"database": {"url": database_url}} if database_url else {}
        return Web(start_node(dicomweb=web_overrides(**dicomweb), **extra))

    return make


@pytest.fixture
def web(web_factory: Callable[..., Web]) -> Web:
    return web_factory()


@pytest.fixture
def loaded_web(web_factory: Callable[..., Web], db_url: str) -> Web:
    """On SQLite and on PostgreSQL (``db_url``): QIDO-RS matching runs in either."""
    web = web_factory(database_url=db_url if db_url.startswith("postgresql") else None)
    c = client(web.url)
    datasets = [make_dataset(s) for s in SPECS]
    for ds in datasets:
        part10(ds)  # gives the data set its file meta
    c.store_instances(datasets)
    return web
