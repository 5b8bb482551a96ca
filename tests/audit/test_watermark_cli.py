"""``synthnode watermark`` keygen / embed / detect on DICOM and PNG, with ledger resolution."""
from __future__ import annotations

import json
import os
import shutil
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from node.cli import app

runner = CliRunner()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SYNTHNODE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("SYNTHNODE_CONFIG", raising=False)
    from pydicom.data import get_testdata_file

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(get_testdata_file("693_UNCR.dcm"), src / "ct.dcm")
    return tmp_path


def _run(*args: str) -> str:
    res = runner.invoke(app, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_keygen_embed_detect_dicom_and_png(env: Path) -> None:
    _run("watermark", "keygen", "--key-id", "9")
    key = env / "var" / "keys" / "watermark.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert runner.invoke(app, ["watermark", "keygen"]).exit_code != 0  # never overwrites silently

    _run("watermark", "embed", str(env / "in"), "--out", str(env / "out"), "--mark-id", "4242")
    marked = env / "out" / "ct.dcm"
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = pydicom.dcmread(env / "in" / "ct.dcm").pixel_array.astype(int)
        b = pydicom.dcmread(marked).pixel_array.astype(int)
    assert 0 < np.abs(a - b).max() <= 2

    # An 8-bit soft-tissue rendering saved as PNG.
    from PIL import Image

    png = env / "out" / "ct_soft.png"
    Image.fromarray(np.clip((b - 1024 + 160) / 400 * 255, 0, 255).astype(np.uint8)).save(png)

    out = _run("watermark", "detect", "--json", str(marked), str(png), str(env / "in" / "ct.dcm"))
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["marked"] for r in rows] == [True, True, False]
    assert rows[0]["payload"] == rows[1]["payload"] == f"{(9 << 40) | 4242:012x}"
    assert rows[0]["key_id"] == 9 and rows[0]["mark_id"] == 4242
    assert "ledger not available" in rows[0]["ledger"]  # no database yet: says so


def test_detect_resolves_ledger_entry(env: Path) -> None:
    from audit.events import Event, EventType
    from audit.ledger import Ledger
    from config.settings import DEFAULT_CONFIG, load_settings
    from node.db import make_engine, upgrade

    _run("watermark", "keygen", "--key-id", "2")
    _run("watermark", "embed", str(env / "in" / "ct.dcm"), "--out", str(env / "out"), "--mark-id", "77")
    url = load_settings(DEFAULT_CONFIG).database_url
    upgrade(url)
    engine = make_engine(url)
    try:
        entry = Ledger(engine).append(Event(
            type=EventType.OUTPUT_CREATED, actor="component:pipeline",
            subject={"series_uid": "1.2.3.4"}, payload={"watermark_payload": f"{(2 << 40) | 77:012x}"},
        ))
    finally:
        engine.dispose()
    out = _run("watermark", "detect", str(env / "out" / "ct.dcm"))
    assert "MARKED" in out and f"ledger entry {entry.seq}" in out and "1.2.3.4" in out
    res = runner.invoke(app, ["watermark", "detect", "--fail-unmarked", str(env / "in" / "ct.dcm")])
    assert res.exit_code == 1 and "not marked" in res.output


def test_embed_verifies_refuses_overwrite_and_shows_required_options(env: Path) -> None:
    """embed reports "marked" only for a copy the detector reads back with the same payload
    (a 128 px CT slice is too small at the default bound: refused, copy removed); an existing
    output is never silently replaced; --help shows what is required."""
    from pydicom.data import get_testdata_file

    _run("watermark", "keygen", "--key-id", "3")
    small = get_testdata_file("CT_small.dcm")  # 128 x 128
    res = runner.invoke(app, ["watermark", "embed", small, str(env / "in" / "ct.dcm"),
                              "--out", str(env / "out"), "--mark-id", "5"])
    assert res.exit_code == 1
    out = " ".join(res.output.split())
    assert "ct.dcm: marked and verified (payload 030000000005" in out
    assert "CT_small.dcm: not marked: the detector does not find the mark" in out
    assert not (env / "out" / "CT_small.dcm").exists() and (env / "out" / "ct.dcm").exists()
    before = (env / "out" / "ct.dcm").read_bytes()
    res = runner.invoke(app, ["watermark", "embed", str(env / "in"), "--out", str(env / "out"),
                              "--mark-id", "6"])
    assert res.exit_code == 1 and "use --force" in res.output
    assert (env / "out" / "ct.dcm").read_bytes() == before
    _run("watermark", "embed", str(env / "in"), "--out", str(env / "out"), "--mark-id", "6",
         "--force")
    assert (env / "out" / "ct.dcm").read_bytes() != before
    res = runner.invoke(app, ["watermark", "embed", "--help"], terminal_width=120)
    assert "Required: one of" in res.output and "--mark-id" in res.output
    res = runner.invoke(app, ["watermark", "embed", str(env / "in"), "--out", str(env / "o2")])
    assert res.exit_code == 2 and "give exactly one of --mark-id or --payload" in res.output


def test_identify_by_mark_and_by_fingerprint(env: Path) -> None:
    """`watermark identify`: a lung-window JPEG q75 of a recorded output slice (the mark's
    exempt case) has no readable mark; its fingerprint finds the output series, with lineage
    (source study, model, destinations) and a verified inclusion proof. The marked DICOM is
    identified by its mark; an unrelated slice is not identified."""
    import dataclasses
    import io

    from PIL import Image
    from pydicom.data import get_testdata_file

    from audit.events import EventType
    from audit.ledger import Ledger
    from audit.watermark.fingerprint import volume_fingerprints
    from config.settings import DEFAULT_CONFIG, load_settings
    from node.db import make_engine, upgrade
    from tests.support.ledger import OUT, STUDY, pipeline_events
    from tests.support.watermark_transforms import window8

    _run("watermark", "keygen", "--key-id", "4")
    _run("watermark", "embed", str(env / "in" / "ct.dcm"), "--out", str(env / "out"),
         "--mark-id", "0")
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(env / "out" / "ct.dcm")
        other = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    marked = ds.pixel_array
    slope, icpt = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    fps = volume_fingerprints(marked[None], hu=True, slope=slope, intercept=icpt)
    events = pipeline_events()
    for i, ev in enumerate(events):
        if ev.type is EventType.OUTPUT_CREATED:
            events[i] = dataclasses.replace(ev, payload={
                **ev.payload, "watermark_payload": f"{(4 << 40):012x}", "fingerprints": fps,
                "output_format": "sc"})
    url = load_settings(DEFAULT_CONFIG).database_url
    upgrade(url)
    engine = make_engine(url)
    try:
        entries = Ledger(engine).append_many(events)
    finally:
        engine.dispose()
    out_seq = next(e.seq for e, ev in zip(entries, events, strict=True)
                   if ev.type is EventType.OUTPUT_CREATED)

    buf = io.BytesIO()
    Image.fromarray(window8(marked * slope + icpt, -600, 1500)).save(buf, "JPEG", quality=75)
    leak = env / "leak.jpg"
    leak.write_bytes(buf.getvalue())
    r = json.loads(_run("watermark", "identify", "--json", str(leak)))
    assert r["fingerprints_recorded"] == 1 and r["candidates"][0]["series_uid"] == OUT
    # a lung-window PNG (mark read by few detectors at 4 HU on 512 px: identified either way)
    png = env / "leak.png"
    Image.fromarray(window8(marked * slope + icpt, -600, 1500)).save(png)
    r = json.loads(_run("watermark", "identify", "--json", str(png)))
    assert r["candidates"][0]["matched"]
    hit = r["identified"]
    assert hit["by"] in ("fingerprint", "mark") and hit["seq"] == out_seq
    assert hit["output_series_uid"] == OUT and hit["lineage"]["source_studies"] == [STUDY]
    assert hit["lineage"]["model"]["model_id"] == "ct-restore"
    assert any(d.startswith("PACS") for d in hit["lineage"]["destinations"])
    proof = hit["inclusion_proof"]
    assert proof["verified"] and proof["seq"] == out_seq and proof["tree_size"] >= out_seq + 1

    text = _run("watermark", "identify", str(env / "out" / "ct.dcm"))
    assert "MARKED" in " ".join(text.split()) and "identified by mark" in " ".join(text.split())

    unrelated = env / "mr.png"
    Image.fromarray((other / max(int(other.max()), 1) * 255).astype(np.uint8)).save(unrelated)
    r = json.loads(_run("watermark", "identify", "--json", str(unrelated)))
    assert r["identified"] is None and not r["candidates"][0]["matched"]
