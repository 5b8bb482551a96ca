"""``synthnode db upgrade`` and ``synthnode studies`` on a config file."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomli_w
from typer.testing import CliRunner

from node.cli import app
from tests.support.net import get_port
from tests.support.dimse import node_settings_dict, scu_store


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_bytes(tomli_w.dumps(node_settings_dict(tmp_path / "data", get_port())).encode())
    return cfg


def test_db_upgrade_then_empty_studies(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    r = CliRunner().invoke(app, ["db", "upgrade", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "data" / "index.db").exists()
    r = CliRunner().invoke(app, ["studies", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "0 studies" in r.output


def test_studies_lists_what_was_stored(start_node: Any, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    node = start_node()
    assert scu_store(node.address, [Path(get_testdata_file("CT_small.dcm")),
                                    Path(get_testdata_file("MR_small.dcm"))]) == [0, 0]
    cfg = tmp_path / "same.toml"
    s = node.ctx.settings
    cfg.write_bytes(tomli_w.dumps({"environment": "development",
                                   "data_dir": str(s.data_dir)}).encode())
    r = CliRunner().invoke(app, ["studies", "--config", str(cfg)], terminal_width=250)
    assert r.exit_code == 0, r.output
    assert "2 studies" in r.output
    assert "CT" in r.output and "MR" in r.output
    assert "CompressedSamples" not in r.output  # names (PHI) only with --names
    r = CliRunner().invoke(app, ["studies", "--plain", "--names", "--config", str(cfg)])
    header, *lines = r.output.splitlines()
    assert header.split("\t")[:3] == ["study_uid", "patient_id", "patient_name"]
    assert len(lines) == 2 and all(len(x.split("\t")) == 8 for x in lines)
    assert {x.split("\t")[2] for x in lines} == {"CompressedSamples^CT1", "CompressedSamples^MR1"}


def test_bad_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[dimse]\nport = 0\n")
    r = CliRunner().invoke(app, ["studies", "--config", str(bad)])
    assert r.exit_code == 2


@pytest.mark.dcmtk
def test_serve_subprocess_answers_echo(node_process: Any) -> None:
    import subprocess

    from tests.support.dimse import dcmtk

    node = node_process()
    r = subprocess.run([dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "SYNTHNODE", "127.0.0.1",
                        str(node.port)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    out = node.output()
    assert "effective configuration (secrets redacted" in out
    assert '\n  dimse.ae_title = "SYNTHNODE"\n' in out  # one readable line per setting
    assert node.terminate() == 0


@pytest.mark.dcmtk
@pytest.mark.slow
def test_serve_with_two_acceptor_processes(node_process: Any, tmp_path: Path) -> None:
    """dimse.acceptor_processes = 2: two processes share the port (SO_REUSEPORT); four
    parallel storescu runs all land; SIGTERM stops parent and children."""
    import subprocess

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from config.settings import load_settings
    from node.app import build_context
    from tests.support.dimse import dcmtk

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    groups = []
    for g in range(4):
        files = []
        for i in range(8):
            src.SOPInstanceUID = generate_uid()
            src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
            f = tmp_path / f"g{g}_{i}.dcm"
            src.save_as(f, enforce_file_format=True)
            files.append(str(f))
        groups.append(files)
    node = node_process(dimse={"acceptor_processes": 2})
    assert "(2 acceptor processes)" in node.output()
    procs = [subprocess.Popen([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "SYNTHNODE",
                               "127.0.0.1", str(node.port), *files]) for files in groups]
    assert [p.wait(120) for p in procs] == [0, 0, 0, 0]
    assert node.terminate(timeout=60) == 0
    ctx = build_context(load_settings(node.config), migrate=False)
    try:
        assert ctx.index.count_instances() == 32
        events = [e.event for e in ctx.ledger.entries()]
        started = [e for e in events if e.type.value == "node.started"]
        assert len(started) == 1 and len(started[0].payload["acceptor_pids"]) == 2
        assert sum(e.type.value == "instance.received" for e in events) == 32
        assert events[-2].type.value == "node.stopped"
    finally:
        ctx.engine.dispose()


@pytest.mark.slow
def test_acceptors_stop_when_the_parent_is_killed(node_process: Any) -> None:
    """A parent killed without a chance to stop its children (SIGKILL): the acceptor
    children notice and stop, instead of keeping the shared DIMSE port."""
    import os
    import signal

    from tests.support.net import wait_for

    node = node_process(dimse={"acceptor_processes": 2})
    pids = wait_for(lambda: _children(node.proc.pid) if len(_children(node.proc.pid)) == 2
                    else None, 30, "two acceptor children")
    assert isinstance(pids, list)
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    node.kill()
    try:
        assert wait_for(lambda: not any(_alive(p) for p in pids), 60,
                        "the orphaned acceptors to stop")
    finally:
        for p in pids:  # whatever the outcome, leave no acceptor behind
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def _children(parent: int) -> list[int]:
    """The live processes whose parent is ``parent``."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent and fields[0] != "Z":
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie left for init to reap counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
