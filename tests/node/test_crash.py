"""Crash consistency (the durability contract) and graceful stop, with the node as a real
``synthnode serve`` subprocess.

kill -9 while 8 DCMTK storescu processes send one study in parallel, restart, then: every instance
that received a success status is present, readable, has the digest the index records and
its ``instance.received`` ledger entry; no index row without its file; no temp file and no
unreferenced file after start-up.
"""
from __future__ import annotations

import hashlib
import re
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from config.settings import load_settings
from node.app import build_context
from tests.support.dimse import dcmtk

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

N_SENDERS = 8
PER_SENDER = 30


def _make_files(root: Path) -> list[list[Path]]:
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    groups = []
    for s in range(N_SENDERS):
        d = root / f"sender{s}"
        d.mkdir(parents=True)
        series = generate_uid()
        files = []
        for i in range(PER_SENDER):
            src.SeriesInstanceUID = series
            src.SOPInstanceUID = generate_uid()
            src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
            src.InstanceNumber = i + 1
            f = d / f"{i:04d}.dcm"
            src.save_as(f, enforce_file_format=True)
            files.append(f)
        groups.append(files)
    return groups


def _successes(log: str) -> list[str]:
    """Files storescu got a Success response for (``-v`` output: 'Sending file: X' ...
    'Received Store Response (Success)')."""
    ok, current = [], None
    for line in log.splitlines():
        m = re.match(r"I: Sending file: (.+)$", line)
        if m:
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            ok.append(current)
            current = None
    return ok


def _count(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return int(c.execute("select count(*) from instances").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_kill_9_mid_ingest_then_restart(node_process: Any, tmp_path: Path) -> None:
    groups = _make_files(tmp_path / "src")
    node = node_process()
    db = node.data_dir / "index.db"
    logs = [tmp_path / f"storescu{i}.log" for i in range(N_SENDERS)]
    senders = []
    for files, log in zip(groups, logs):
        fh = log.open("w")
        senders.append(subprocess.Popen(
            [dcmtk("storescu"), "-v", "-aet", "STORESCU", "-aec", "SYNTHNODE", "127.0.0.1",
             str(node.port), *map(str, files)], stdout=fh, stderr=subprocess.STDOUT))
        fh.close()
    deadline = time.monotonic() + 120
    total = N_SENDERS * PER_SENDER
    while _count(db) < total // 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    node.kill()  # SIGKILL mid-run
    for p in senders:
        p.wait(60)
    ok = [f for log in logs for f in _successes(log.read_text(errors="replace"))]
    assert 0 < len(ok) < total, "the kill must land mid-run for this test to mean anything"

    node.restart()  # start-up recovery runs before the node listens
    out = node.output()
    assert "synthnode: listening" in out
    settings = load_settings(node.config)
    ctx = build_context(settings, migrate=False)
    try:
        # no orphan temp file, no unreferenced file after start-up
        assert not list(ctx.store.temp_dir.iterdir())
        referenced = ctx.index.file_paths()
        assert ctx.store.unreferenced(referenced) == []
        # no index row without its file, and each file has the recorded digest
        rows = ctx.index.instances()
        for r in rows:
            assert ctx.store.exists(r.file_path), r.file_path
            assert ctx.store.sha256(r.file_path) == r.sha256
        # every success the senders saw is stored, readable and in the ledger
        indexed = {r.sop_instance_uid: r for r in rows}
        for f in ok:
            uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            assert uid in indexed, f"{f} got Success but is not stored"
            ds = pydicom.dcmread(ctx.store.path(indexed[uid].file_path))
            assert ds.SOPInstanceUID == uid and ds.pixel_array.shape == (128, 128)
            received = ctx.ledger.query(uids=[uid], event_types=["instance.received"])
            assert received, f"{uid} has no instance.received ledger entry"
        # the ledger and the index agree: one stored-event per indexed instance
        stored_events = [e for e in ctx.ledger.query(event_types=["instance.received"])
                         if e.event.payload.get("result") == "stored"]
        assert {e.event.subject["sop_uid"] for e in stored_events} == set(indexed)
    finally:
        ctx.engine.dispose()
    print(f"\ncrash test: {len(ok)} successes before kill -9, {len(rows)} indexed after restart")


def test_sigterm_finishes_and_refuses_new(node_process: Any, tmp_path: Path) -> None:
    files = _make_files(tmp_path / "src")[0][:20]
    node = node_process()
    log = tmp_path / "storescu.log"
    with log.open("w") as fh:
        sender = subprocess.Popen(
            [dcmtk("storescu"), "-v", "-aet", "STORESCU", "-aec", "SYNTHNODE", "127.0.0.1",
             str(node.port), *map(str, files)], stdout=fh, stderr=subprocess.STDOUT)
    db = node.data_dir / "index.db"
    deadline = time.monotonic() + 60
    while _count(db) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    rc = node.terminate()
    sender.wait(60)
    assert rc == 0
    assert "synthnode: stopped" in node.output()
    ok = _successes(log.read_text())
    # after SIGTERM the port is closed: a new association is refused
    r = subprocess.run([dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "SYNTHNODE", "127.0.0.1",
                        str(node.port)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    ctx = build_context(load_settings(node.config), migrate=False)
    try:
        indexed = {r.sop_instance_uid for r in ctx.index.instances()}
        for f in ok:
            assert pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID in indexed
        types = [e.event.type.value for e in ctx.ledger.entries()]
        # node.stopped, then the final signed checkpoint that covers it
        assert types[-2:] == ["node.stopped", "checkpoint.signed"]
        assert ctx.ledger.checkpoints()[-1][0] == len(types) - 1
        assert not list(ctx.store.temp_dir.iterdir())
    finally:
        ctx.engine.dispose()


def test_digest_helper_matches_hashlib(tmp_path: Path) -> None:
    """FileStore.sha256 (used above) is the plain SHA-256 of the file's bytes."""
    from storage.filestore import FileStore

    fs = FileStore(tmp_path / "s")
    stored = fs.write("a/b.dcm", b"x" * 12345)
    assert fs.sha256("a/b.dcm") == hashlib.sha256(b"x" * 12345).hexdigest() == stored.sha256
