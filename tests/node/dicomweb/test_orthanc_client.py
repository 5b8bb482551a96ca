"""Orthanc's DICOMweb plugin as a client of our server (``DicomWeb.Servers``): QIDO-RS
through Orthanc, WADO-RS metadata through Orthanc, a study retrieved into Orthanc with
bytes equal to ours, and STOW-RS from Orthanc to us."""
from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from node.dicom.part10 import split_part10
from tests.support.dicomweb import TOKENS, client
from tests.support.net import IN_CI
from tests.support.orthanc import OrthancServer, dicomweb_plugin


def _orthanc(factory: Callable[..., OrthancServer], web: Any) -> OrthancServer:
    if dicomweb_plugin() is None:
        msg = "Orthanc DICOMweb plugin not installed (Debian package orthanc-dicomweb)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return factory(dicomweb_servers={"synthnode": {
        "Url": web.url + "/",
        "HttpHeaders": {"Authorization": f"Bearer {TOKENS['rw'][0]}"}}})


def test_orthanc_queries_and_retrieves_from_us(
        web: Any, orthanc_factory: Callable[..., OrthancServer]) -> None:
    ct, mr = (dcmread(get_testdata_file(n)) for n in ("CT_small.dcm", "MR_small.dcm"))
    client(web.url).store_instances([ct, mr])
    orthanc = _orthanc(orthanc_factory, web)
    found = orthanc.post("/dicom-web/servers/synthnode/qido",
                         {"Uri": "/studies", "Arguments": {"PatientID": "1CT1"}})
    # Orthanc answers its own short form: {"0020000D": {"Value": "1.2...", ...}}
    assert [s["0020000D"]["Value"] for s in found] == [str(ct.StudyInstanceUID)]
    md = orthanc.post("/dicom-web/servers/synthnode/get",
                      {"Uri": f"/studies/{mr.StudyInstanceUID}/metadata"})
    assert md[0]["00080018"]["Value"] in (str(mr.SOPInstanceUID), [str(mr.SOPInstanceUID)])
    orthanc.post("/dicom-web/servers/synthnode/retrieve",
                 {"Resources": [{"Study": str(ct.StudyInstanceUID)}], "Synchronous": True})
    assert orthanc.instance_uids() == {str(ct.SOPInstanceUID)}
    inst = web.node.ctx.index.get_instance(str(ct.SOPInstanceUID))
    ours = web.node.ctx.store.read(inst.file_path)
    theirs = orthanc.instance_file(str(ct.SOPInstanceUID))
    # the data set bytes are equal (Orthanc writes its own file meta)
    assert split_part10(theirs)[1] == split_part10(ours)[1]


def test_orthanc_stows_to_us(web: Any, orthanc_factory: Callable[..., OrthancServer]) -> None:
    orthanc = _orthanc(orthanc_factory, web)
    with open(get_testdata_file("MR_small.dcm"), "rb") as f:
        data = f.read()
    r = httpx.post(orthanc.url + "/instances", content=data, timeout=30)
    r.raise_for_status()
    oid = r.json()["ID"]
    orthanc.post("/dicom-web/servers/synthnode/stow", {"Resources": [oid], "Synchronous": True})
    mr = dcmread(get_testdata_file("MR_small.dcm"))
    got = web.node.ctx.index.get_instance(str(mr.SOPInstanceUID))
    assert got is not None
    stored = web.node.ctx.store.read(got.file_path)
    assert dcmread(io.BytesIO(stored)).PixelData == mr.PixelData
