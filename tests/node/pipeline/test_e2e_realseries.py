"""Whole real series nobody here wrote (docs/realdata.md, fetched by scripts/fetch-realdata)
end to end: DCMTK storescu -> node (shipped models approved, quality gate on with its
defaults) -> real Orthanc on loopback. Each series is delivered as a synthetic series with
the input's geometry, its padding / out-of-FOV pixels unchanged, dciodvfy-clean and carrying a
verifiable watermark, and the ledger verifies; the phantom under a hold rule is held with the
rule named. Skips (naming the setup step) where the series were not fetched."""
from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from typer.testing import CliRunner

from audit.watermark import WatermarkKey, detect
from node.cli import app
from node.dicom.volume import frames_of
from tests.support.dicomcheck import dciodvfy_errors
from tests.support.e2e_real import run_real_inputs
from tests.support.e2e_realseries import HOLD_RULES, INPUTS, TASKS
from tests.support.net import require_tool
from tests.support.orthanc import OrthancServer
from tests.support.realseries import require

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk, pytest.mark.slow]


def _position(ds: Dataset) -> tuple[float, ...]:
    return tuple(round(float(v), 3) for v in ds.ImagePositionPatient)


def test_real_series_storescu_to_orthanc(tmp_path: Path, orthanc: OrthancServer) -> None:
    for name in ("cbct-head", "mr-skyra-gre", "mr-memprage"):
        require(name)
    tool = require_tool("dciodvfy")
    outcomes, node = run_real_inputs(tmp_path, orthanc, INPUTS, tasks=TASKS,
                                     hold_rules=HOLD_RULES)
    key = WatermarkKey.from_file(node.ctx.settings.watermark_key_file)
    by_name = {o.input.name: o for o in outcomes}
    in_orthanc = orthanc.instance_uids()
    left_out = {e.event.subject.get("sop_uid"): e.event.payload
                for e in node.ctx.ledger.entries() if e.event.type.value == "instance.left_out"}

    def delivered(name: str) -> tuple[list[Dataset], list[Dataset]]:
        """The input's image slices and the delivered output, both in slice order, after
        the checks every delivered series gets."""
        o = by_name[name]
        (j,) = o.jobs
        assert j["state"] == "succeeded" and j["result"].get("outcome") == "passed", (name, j)
        (series,) = o.delivered
        uids = [i.sop_instance_uid for i in node.ctx.index.instances(series_instance_uid=series)]
        assert uids and set(uids) <= in_orthanc
        outs: list[Dataset] = [pydicom.dcmread(BytesIO(orthanc.instance_file(u)))
                               for u in uids]
        src = [d for d in o.input.datasets() if "ImagePositionPatient" in d]
        assert len(outs) == len(src)
        outs.sort(key=lambda d: int(d.InstanceNumber))
        for k, (s, d) in enumerate(zip(src, outs, strict=True)):
            assert d.SyntheticData == "YES" and d.SeriesDescription.startswith("SYNTHETIC")
            assert d.StudyInstanceUID == s.StudyInstanceUID
            assert d.FrameOfReferenceUID == s.FrameOfReferenceUID
            # geometry kept, slice by slice
            np.testing.assert_allclose([float(v) for v in d.ImagePositionPatient],
                                       [float(v) for v in s.ImagePositionPatient], atol=1e-3)
            np.testing.assert_allclose([float(v) for v in d.ImageOrientationPatient],
                                       [float(v) for v in s.ImageOrientationPatient], atol=1e-6)
            np.testing.assert_allclose([float(v) for v in d.PixelSpacing],
                                       [float(v) for v in s.PixelSpacing], atol=1e-6)
            assert (d.Rows, d.Columns) == (s.Rows, s.Columns)
            assert detect(d.pixel_array, [key]).marked, (name, k)
            if k in (0, len(outs) - 1):  # dciodvfy on the ends of every series
                p = tmp_path / f"{name}-{k}.dcm"
                d.save_as(p, enforce_file_format=True)
                assert dciodvfy_errors(p, tool) == [], (name, k)
        assert [_position(d) for d in outs] == [_position(s) for s in src]
        return src, outs

    # Varian OBI cone-beam CT: delivered; the stored floor (raw 0 = -1000 HU outside the
    # reconstruction circle and the clipped air connected to it) passes through unchanged
    src, outs = delivered("cbct-head-16")
    for s, d in zip(src, outs, strict=True):
        (frame,) = frames_of(s)
        floor = frame.padding
        assert floor is not None and 0.3 < floor.mean() < 0.6
        hu = d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
        assert (hu[floor] == -1000.0).all()
        # ... and inside the FOV the output is the input restored: same tissue, air still air
        inp = s.pixel_array.astype(np.float64) - 1000.0
        assert abs(float(np.median(hu[~floor] - inp[~floor]))) < 5.0
    # the RT Structure Set sent with the slices: left out of the volume, named in the ledger
    (rs,) = [d for d in by_name["cbct-head-16"].input.datasets()
             if d.Modality == "RTSTRUCT"]
    assert str(rs.SOPInstanceUID) in left_out

    # Siemens Skyra GRE as received: refused at ingest with the reason named (DIMSE failure
    # status to storescu, instance.rejected in the ledger); nothing stored or sent
    raw = by_name["mr-skyra-gre-as-received"]
    assert raw.jobs == [] and raw.delivered == []
    raw_series = str(raw.input.datasets()[0].SeriesInstanceUID)
    assert node.ctx.index.instances(series_instance_uid=raw_series) == []
    rejected = [e.event.payload for e in node.ctx.ledger.entries()
                if e.event.type.value == "instance.rejected"]
    assert len(rejected) == raw.input.count
    assert all(p["reason"] == "invalid_uid" and "SeriesInstanceUID" in p["detail"]
               for p in rejected), rejected
    # ... with only that UID made valid: delivered with the hold rule off (MR_SKYRA) ...
    src, outs = delivered("mr-skyra-gre-16")
    for s, d in zip(src, outs, strict=True):
        mr = d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
        assert mr.min() >= 0
        body = s.pixel_array > 0.1 * np.percentile(s.pixel_array, 99)
        # background stays background, the phantom keeps its signal
        assert mr[~body].mean() <= s.pixel_array[~body].mean() + 1.0
        assert abs(np.median(mr[body]) / np.median(s.pixel_array[body]) - 1.0) < 0.05
    # ... and held by the rule on Patient Name, named, each object in the ledger (MR_QA)
    held = by_name["mr-skyra-gre-qa-hold"]
    assert held.jobs == [] and held.delivered == []
    rep = node.pipeline.study_report(held.study_uid)
    (series,) = rep["series"]
    assert series["rule"] == HOLD_RULES[0]["name"]
    assert f"held by rule {HOLD_RULES[0]['name']!r}" in series["held"]
    held_uids = [i.sop_instance_uid
                 for i in node.ctx.index.instances(study_instance_uid=held.study_uid)]
    assert len(held_uids) == held.input.count
    assert all(left_out[u]["rule"] == HOLD_RULES[0]["name"] for u in held_uids)
    assert not set(held_uids) & in_orthanc

    # Siemens MEMPRAGE, 6 sagittal slices 9 mm apart (human head): delivered
    delivered("mr-memprage-6")

    # the ledger of the whole session verifies
    r = CliRunner().invoke(app, ["audit", "verify", "-c", str(tmp_path / "synthnode.toml")])
    assert r.exit_code == 0 and "OK" in r.output, r.output
