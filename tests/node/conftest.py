"""Fixtures for node tests: a real node on a free loopback port, in-process or as a
subprocess, and the DCMTK command-line tools as real DIMSE peers.

Reuse them in any ``tests/node`` test (query/retrieve, commitment, pipeline ...):

``start_node(**overrides) -> Node``
    Factory fixture. Builds a node on a fresh SQLite database in ``tmp_path`` (or
    ``database={"url": ...}``), applies migrations, starts the DIMSE SCP in this process
    on 127.0.0.1 and a free port; stopped at teardown. ``overrides`` are top-level
    settings sections merged over :func:`node_settings_dict` (e.g.
    ``dimse={"duplicate_policy": "reject"}``). The node's address: ``node.address``;
    its AE title: ``node.ctx.settings.dimse.ae_title``; index: ``node.ctx.index``;
    ledger: ``node.ctx.ledger``.

``node_process(**overrides) -> NodeProcess``
    Factory fixture. Writes a TOML config and runs ``synthnode serve`` in a subprocess
    (returns once it listens). ``.port``, ``.config``, ``.data_dir``, ``.terminate()``
    (SIGTERM, graceful), ``.kill()`` (SIGKILL), ``.restart()``. Killed at teardown.

``dcmtk(name) -> str``
    Path of a DCMTK tool (``storescu``, ``echoscu``, ``findscu`` ...): the pyenv shims on
    this machine shadow DCMTK with pynetdicom's apps of the same names, so PATH lookup
    alone is wrong. Missing tool: failure in CI, skip locally.

Calling AE titles allowed by default: STORESCU, ECHOSCU, FINDSCU, GETSCU, MOVESCU,
TESTSCU (each from any host). Called AE title: SYNTHNODE. The pipeline is disabled by
default (``pipeline={"enabled": True, ...}`` to test it).

Helpers: ``scu_store(address, files)`` sends files' data set bytes unchanged (pynetdicom)
and returns the statuses; ``write_part10`` wraps raw (possibly malformed) data set bytes
in a valid file meta; ``ledger_events(node, type)`` lists a node's ledger events.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from config.settings import load_settings
from tests.conftest import IN_CI, get_port

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PEERS = ["STORESCU", "ECHOSCU", "FINDSCU", "GETSCU", "MOVESCU", "TESTSCU"]
_DCMTK_DIRS = ("/usr/bin", "/usr/local/bin", "/opt/dcmtk/bin")


def dcmtk(name: str) -> str:
    """Path of the DCMTK executable ``name`` (not a same-named pynetdicom app)."""
    candidates = [str(Path(d) / name) for d in _DCMTK_DIRS]
    which = shutil.which(name)
    if which:
        candidates.append(which)
    for c in candidates:
        if not os.access(c, os.X_OK):
            continue
        try:
            out = subprocess.run([c, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return c
    if IN_CI:
        pytest.fail(f"DCMTK {name} is not installed (scripts/test installs it)")
    pytest.skip(f"DCMTK {name} not installed")
    raise AssertionError  # unreachable


def node_settings_dict(data_dir: Path, port: int, **overrides: Any) -> dict[str, Any]:
    """Settings for a test node (plain dict; TOML-serialisable)."""
    d: dict[str, Any] = {
        "environment": "development",
        "data_dir": str(data_dir),
        "log_level": "INFO",
        "dimse": {
            "ae_title": "SYNTHNODE",
            "bind_address": "127.0.0.1",
            "port": port,
            "allowed_peers": [{"ae_title": a} for a in DEFAULT_PEERS],
            "max_associations": 16,
            "acse_timeout_s": 10,
            "dimse_timeout_s": 30,
            "network_timeout_s": 30,
        },
        "storage": {"min_free_bytes": 0},
        # DIMSE tests run without the pipeline; pipeline tests pass pipeline={...}
        "pipeline": {"enabled": False},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(d.get(key), dict):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    return d


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


@dataclass
class NodeProcess:
    """``synthnode serve`` in a subprocess."""

    config: Path
    data_dir: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    def start(self, timeout: float = 60.0) -> NodeProcess:
        log = self.log.with_name(f"{self.log.stem}.{len(self.logs)}.log")
        self.logs.append(log)
        fh = log.open("wb")
        env = {**os.environ, "PYTHONPATH": str(REPO), "SYNTHNODE_CONFIG": str(self.config)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from node.cli import main; "
             "sys.argv[0] = 'synthnode'; main()", "serve", "--config", str(self.config),
             "--grace", "10"],
            stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env,
        )
        fh.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"synthnode: listening" in log.read_bytes():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited ({self.proc.returncode}):\n"
                                   + log.read_text(errors="replace")[-4000:])
            time.sleep(0.1)
        self.kill()
        raise RuntimeError("node did not start in time:\n" + log.read_text(errors="replace"))

    def output(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> NodeProcess:
        self.kill()
        return self.start()


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


def write_part10(path: Path, dataset_bytes: bytes, sop_class: str, sop_instance: str,
                 transfer_syntax: str) -> Path:
    """Write raw data set bytes behind a valid File Meta header (to send malformed data)."""
    from node.ingest import build_part10

    path.write_bytes(build_part10(dataset_bytes, sop_class, sop_instance, transfer_syntax))
    return path


def scu_store(address: tuple[str, int], files: list[Path], *, calling: str = "TESTSCU",
              called: str = "SYNTHNODE") -> list[int | None]:
    """Send each file's data set bytes unchanged (pynetdicom, chunked from the file) on one
    association; returns each C-STORE status (None: no response). Raises if refused."""
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE, _config

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    seen: set[tuple[str, str]] = set()
    for f in files:
        m = read_file_meta_info(f)
        key = (str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID))
        if key not in seen:
            seen.add(key)
            ae.add_requested_context(*key)
    assoc = ae.associate(address[0], address[1], ae_title=called)
    if not assoc.is_established:
        raise ConnectionRefusedError("association refused")
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    out: list[int | None] = []
    try:
        for f in files:
            rsp = assoc.send_c_store(f)
            out.append(getattr(rsp, "Status", None))
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    return out


def ledger_events(node: Any, type_: str | None = None) -> list[Any]:
    """Events in a node's ledger (optionally of one type), oldest first."""
    evs = [e.event for e in node.ctx.ledger.entries()]
    return [e for e in evs if type_ is None or getattr(e.type, "value", e.type) == type_]
