"""Real scans end to end, one node session for every class of real input: DCMTK storescu ->
node (shipped models approved through the model gate, quality gate on with its defaults) ->
real Orthanc. Each input either arrives as a delivered, dciodvfy-clean, watermark-detectable
synthetic series, or ends in its documented refusal with the reason on the job (see the
table in bench/RESULTS.md)."""
from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from audit.watermark import WatermarkKey, detect
from tests.support.dicomcheck import dciodvfy_errors
from tests.support.e2e_real import run_real_inputs
from tests.support.net import require_tool
from tests.support.orthanc import OrthancServer

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk, pytest.mark.slow]


def test_real_inputs_storescu_to_orthanc(tmp_path: Path, orthanc: OrthancServer) -> None:
    tool = require_tool("dciodvfy")
    outcomes, node = run_real_inputs(tmp_path, orthanc)
    key = WatermarkKey.from_file(node.ctx.settings.watermark_key_file)
    by_name = {o.input.name: o for o in outcomes}
    in_orthanc = orthanc.instance_uids()

    def check_delivered(series_uid: str) -> None:
        uids = [i.sop_instance_uid for i in node.ctx.index.instances(
            series_instance_uid=series_uid)]
        assert uids and set(uids) <= in_orthanc
        ds = pydicom.dcmread(BytesIO(orthanc.instance_file(uids[0])))
        assert ds.SyntheticData == "YES"
        p = tmp_path / f"{series_uid}.dcm"
        ds.save_as(p, enforce_file_format=True)
        assert dciodvfy_errors(p, tool) == []
        assert detect(ds.pixel_array, [key]).marked

    # the real 512 px head CT with padding and head holder: both tasks pass the gate and
    # are delivered (before: held by hu_range, and CT->MR air came out brighter than brain)
    head = by_name["head-ct-512-padding"]
    assert {j["task"]: j["result"].get("outcome") for j in head.jobs} == {
        "ct_denoise": "passed", "ct_to_mr": "passed"}, head.jobs
    assert len(head.delivered) == 2
    for s in head.delivered:
        check_delivered(s)
    # the restored CT keeps the scanner's padding values, watermark included (no mark there)
    pad = pydicom.dcmread(get_testdata_file("693_UNCR.dcm")).pixel_array == -2000
    for s in head.delivered:
        for i in node.ctx.index.instances(series_instance_uid=s):
            ds = pydicom.dcmread(BytesIO(orthanc.instance_file(i.sop_instance_uid)))
            if ds.Modality == "CT":
                hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                assert (hu[pad] == -3024).all()
                # ... and declares them padding, on exactly those pixels
                assert (ds.pixel_array == int(ds.PixelPaddingValue)).tolist() == pad.tolist()
    # every other input: delivered, or a named outcome / refusal on the job
    for name in ("ge-ct-128", "philips-mr-1024"):
        o = by_name[name]
        for j in o.jobs:
            assert j["state"] == "succeeded", (name, j["error"])
            assert not j["result"].get("held"), (name, j["result"]["held"])  # no false hold
            if j["result"]["outcome"] == "refused":  # small slices: mark not verifiable
                assert j["result"]["refused"][0]["checks"] == ["watermark_unverified"]
        for s in o.delivered:
            check_delivered(s)
    (j,) = by_name["mr-multiframe-no-geometry"].jobs
    assert j["state"] == "failed" and "missing_geometry" in (j["error"] or "")
