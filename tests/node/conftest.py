"""Fixtures for node tests (every ``tests/node`` sub-package): real nodes and real peers.

``start_node(**overrides) -> Node``
    Factory fixture. Builds a node on a fresh SQLite database in ``tmp_path`` (or
    ``database={"url": ...}``), applies migrations, starts the DIMSE SCP in this process
    on 127.0.0.1 and a free port; stopped at teardown. ``overrides`` are top-level
    settings sections merged over :func:`tests.support.dimse.node_settings_dict` (e.g.
    ``dimse={"duplicate_policy": "reject"}``). The node's address: ``node.address``;
    its AE title: ``node.ctx.settings.dimse.ae_title``; index: ``node.ctx.index``;
    ledger: ``node.ctx.ledger``.

``node_process(**overrides) -> NodeProcess``
    Factory fixture. Writes a TOML config and runs ``synthnode serve`` in a subprocess
    (returns once it listens). ``.port``, ``.config``, ``.data_dir``, ``.terminate()``
    (SIGTERM, graceful), ``.kill()`` (SIGKILL), ``.restart()``. Killed at teardown.

``orthanc_factory`` / ``orthanc`` / ``orthanc_dicomweb``
    A real Orthanc on loopback per test (:class:`tests.support.orthanc.OrthancServer`);
    ``orthanc_dicomweb`` skips (fails in CI) without the DICOMweb plugin.

Helpers (DCMTK paths, settings, senders, ledger reads) live in :mod:`tests.support.dimse`.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from config.settings import load_settings
from tests.support.dimse import NodeProcess, node_settings_dict
from tests.support.orthanc import OrthancServer
from tests.support.net import IN_CI, get_port


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    from node.app import create_node

    nodes: list[Any] = []

    def _start(**overrides: Any) -> Any:
        data_dir = tmp_path / f"node{len(nodes)}"
        settings = load_settings(None, **node_settings_dict(data_dir, get_port(), **overrides))
        node = create_node(settings)
        node.start()
        nodes.append(node)
        return node

    yield _start
    for n in nodes:
        n.stop(grace_s=5)


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    procs: list[NodeProcess] = []

    def _make(**overrides: Any) -> NodeProcess:
        i = len(procs)
        data_dir = tmp_path / f"pnode{i}"
        data_dir.mkdir()
        port = get_port()
        cfg = tmp_path / f"pnode{i}.toml"
        cfg.write_bytes(tomli_w.dumps(node_settings_dict(data_dir, port, **overrides)).encode())
        p = NodeProcess(config=cfg, data_dir=data_dir, port=port, log=tmp_path / f"pnode{i}.log")
        procs.append(p)
        return p.start()

    yield _make
    for p in procs:
        p.kill()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    """Start Orthanc servers with extra configuration; all are stopped after the test."""
    servers: list[OrthancServer] = []

    def start(**kwargs: Any) -> OrthancServer:
        server = OrthancServer(tmp_path / f"orthanc{len(servers)}", **kwargs)
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
            shutil.rmtree(server.workdir, ignore_errors=True)


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., OrthancServer]) -> OrthancServer:
    """A running Orthanc on loopback, stopped (and its storage removed) after the test."""
    return orthanc_factory()


@pytest.fixture
def orthanc_dicomweb(orthanc: OrthancServer) -> OrthancServer:
    """``orthanc`` with its DICOMweb plugin loaded (fails in CI, skips locally if missing)."""
    if orthanc.plugin is None:
        msg = "Orthanc DICOMweb plugin not installed (Debian package orthanc-dicomweb)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return orthanc
