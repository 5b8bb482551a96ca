"""WADO-RS with dicomweb-client and raw HTTP: instances in every transfer-syntax mode,
metadata (+ ETag, forwarded host), bulk data round trip, frames, rendered, thumbnail."""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames

from tests.support.dicomweb import auth, client
from tests.support.dimse import ledger_events


def _store(web: Any, *names: str) -> list[Dataset]:
    datasets = [dcmread(get_testdata_file(n)) for n in names]
    client(web.url).store_instances(datasets)
    return datasets


def _url(web: Any, ds: Dataset, tail: str = "") -> str:
    return (f"{web.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}{tail}")


def _stored(web: Any, ds: Dataset) -> bytes:
    inst = web.node.ctx.index.get_instance(str(ds.SOPInstanceUID))
    return bytes(web.node.ctx.store.read(inst.file_path))


def _parts(r: httpx.Response) -> list[tuple[str, bytes]]:
    from node.dicomweb.media import MultipartReader, parse_media_type

    bnd = parse_media_type(r.headers["content-type"]).params["boundary"]
    reader = MultipartReader(bnd)
    parts = reader.feed(r.content)
    reader.close()
    return [(p.content_type, p.body) for p in parts]


def _get(url: str, accept: str | None = None, **headers: str) -> httpx.Response:
    h = {**auth("reader"), **headers}
    if accept is not None:
        h["Accept"] = accept
    return httpx.get(url, headers=h, timeout=60)


def test_instances_as_stored_and_transcoded(web: Any) -> None:
    ct, j2k = _store(web, "CT_small.dcm", "JPEG2000.dcm")
    c = client(web.url, "reader")
    # transfer-syntax=* (dicomweb-client's default): the stored file, byte for byte
    r = _get(_url(web, j2k), 'multipart/related; type="application/dicom"; transfer-syntax=*')
    ((ctype, body),) = _parts(r)
    assert body == _stored(web, j2k)
    assert "1.2.840.10008.1.2.4.91" in ctype
    # no transfer-syntax: explicit VR little endian, decompressed
    got = c.retrieve_instance(j2k.StudyInstanceUID, j2k.SeriesInstanceUID, j2k.SOPInstanceUID,
                              media_types=("application/dicom",))
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert np.array_equal(got.pixel_array, j2k.pixel_array)
    # an impossible syntax: 406 problem+json
    r = _get(_url(web, ct),
             'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50')
    assert r.status_code == 406 and r.headers["content-type"] == "application/problem+json"
    assert _get(_url(web, ct), "application/dicom+json").status_code == 406
    # series and study
    series = c.retrieve_series(ct.StudyInstanceUID, ct.SeriesInstanceUID)
    assert [str(d.SOPInstanceUID) for d in series] == [str(ct.SOPInstanceUID)]
    study = c.retrieve_study(ct.StudyInstanceUID)
    assert len(study) == 1 and study[0].PatientName == ct.PatientName
    assert _get(f"{web.url}/studies/1.2.3.4", "*/*").status_code == 404


def test_metadata_bulkdata_round_trip(web: Any) -> None:
    (ct,) = _store(web, "CT_small.dcm")
    c = client(web.url, "reader")
    (md,) = c.retrieve_instance_metadata(ct.StudyInstanceUID, ct.SeriesInstanceUID,
                                         ct.SOPInstanceUID),
    uri = md["7FE00010"]["BulkDataURI"]
    assert uri == _url(web, ct, "/bulkdata/7FE00010")

    def fetch(tag: str, vr: str, value: str) -> bytes:
        return bytes(c.retrieve_bulkdata(value)[0])

    rebuilt = Dataset.from_json(md, bulk_data_uri_handler=fetch)
    stored = dcmread(io.BytesIO(_stored(web, ct)))
    del stored[0xFFFCFFFC]  # Data Set Trailing Padding (PS3.10 7.2): no information
    assert [e.tag for e in rebuilt] == [e.tag for e in stored]
    for elem in stored:
        assert rebuilt[elem.tag].value == elem.value, elem
    assert rebuilt.PixelData == stored.PixelData


def test_metadata_etag_and_forwarded_host(web: Any) -> None:
    (mr,) = _store(web, "MR_small.dcm")
    url = f"{web.url}/studies/{mr.StudyInstanceUID}/series/{mr.SeriesInstanceUID}/metadata"
    r = _get(url, "application/dicom+json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+json"
    etag = r.headers["etag"]
    assert _get(url, None, **{"If-None-Match": etag}).status_code == 304
    r = _get(url, None, **{"X-Forwarded-Host": "pacs.example.org",
                           "X-Forwarded-Proto": "https"})
    assert r.json()[0]["7FE00010"]["BulkDataURI"].startswith(
        f"https://pacs.example.org/studies/{mr.StudyInstanceUID}/")
    assert r.headers["etag"] != etag  # the URIs in the body differ
    study_md = _get(f"{web.url}/studies/{mr.StudyInstanceUID}/metadata").json()
    assert study_md[0]["00080018"]["Value"] == [str(mr.SOPInstanceUID)]


def test_frames_uncompressed_multiframe(web: Any) -> None:
    (mf,) = _store(web, "emri_small.dcm")
    c = client(web.url, "reader")
    frames = c.retrieve_instance_frames(mf.StudyInstanceUID, mf.SeriesInstanceUID,
                                        mf.SOPInstanceUID, [1, 3, 10])
    arr = mf.pixel_array
    for got, k in zip(frames, [1, 3, 10], strict=True):
        assert got == arr[k - 1].astype("<u2").tobytes()
    assert _get(_url(web, mf, "/frames/11"), "*/*").status_code == 404
    assert _get(_url(web, mf, "/frames/0"), "*/*").status_code == 400


def test_frames_compressed(web: Any) -> None:
    (mf,) = _store(web, "emri_small_jpeg_2k_lossless.dcm")
    native = list(generate_frames(mf.PixelData, number_of_frames=10))
    r = _get(_url(web, mf, "/frames/2,4"),
             'multipart/related; type="application/octet-stream"; transfer-syntax=*')
    assert [b for _, b in _parts(r)] == [native[1], native[3]]
    r = _get(_url(web, mf, "/frames/2"), 'multipart/related; type="image/jp2"')
    ((ctype, body),) = _parts(r)
    assert ctype.startswith("image/jp2") and body == native[1]
    # default: decoded to little endian pixels
    r = _get(_url(web, mf, "/frames/2"), 'multipart/related; type="application/octet-stream"')
    ((_, body),) = _parts(r)
    assert body == mf.pixel_array[1].astype(mf.pixel_array.dtype.newbyteorder("<")).tobytes()


def test_rendered_and_thumbnail(web: Any) -> None:
    ct, rgb = _store(web, "CT_small.dcm", "SC_rgb.dcm")
    r = _get(_url(web, ct, "/rendered"), "image/jpeg")
    img = Image.open(io.BytesIO(r.content))
    assert (r.headers["content-type"], img.format, img.size) == ("image/jpeg", "JPEG", (128, 128))
    png = _get(_url(web, ct, "/rendered?viewport=64,64&window=40,400"), "image/png")
    img = np.asarray(Image.open(io.BytesIO(png.content)))
    assert img.shape == (64, 64) and img.max() > img.min()
    narrow = np.asarray(Image.open(io.BytesIO(
        _get(_url(web, ct, "/rendered?viewport=64,64&window=40,1"), "image/png").content)))
    assert not np.array_equal(img, narrow)  # the window is applied
    thumb = Image.open(io.BytesIO(_get(_url(web, rgb, "/thumbnail"), "*/*").content))
    assert thumb.mode == "RGB" and max(thumb.size) <= 128
    frame = _get(_url(web, ct, "/frames/1/rendered?quality=20"), "image/jpeg")
    assert frame.status_code == 200 and len(frame.content) < len(r.content)
    series = _get(f"{web.url}/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}"
                  "/rendered", "image/png")
    assert series.headers["content-type"] == "image/png"
    study = _get(f"{web.url}/studies/{ct.StudyInstanceUID}/thumbnail", "image/jpeg")
    assert study.status_code == 200
    assert _get(_url(web, ct, "/rendered"), "image/gif").status_code == 406
    assert _get(_url(web, ct, "/rendered?window=40"), "image/png").status_code == 400


@pytest.mark.parametrize("kind", ["instances", "metadata", "frames", "rendered"])
def test_every_read_is_a_ledger_entry(web: Any, kind: str) -> None:
    (ct,) = _store(web, "CT_small.dcm")
    tail = {"instances": "", "metadata": "/metadata", "frames": "/frames/1",
            "rendered": "/rendered"}[kind]
    assert _get(_url(web, ct, tail), "*/*").status_code == 200
    web.flush()
    evs = ledger_events(web.node, "dicomweb.access")
    assert [e.payload["kind"] for e in evs] == [kind]
    assert evs[0].actor == "token:reader"
    assert evs[0].subject["study_uid"] == str(ct.StudyInstanceUID)
    assert evs[0].subject.get("patient")  # keyed digest: auditors find it by patient


def test_transcoded_instances_pass_dciodvfy(web: Any, tmp_path: Path) -> None:
    """What WADO-RS writes (a transcoded file) is valid: dciodvfy finds no error that the
    stored original does not have."""
    from tests.support.dicomcheck import dciodvfy_errors
    from tests.support.net import require_tool

    tool = require_tool("dciodvfy")
    ct, j2k = _store(web, "CT_small.dcm", "JPEG2000.dcm")
    for ds, ts in ((ct, "1.2.840.10008.1.2"), (j2k, "1.2.840.10008.1.2.1")):
        r = _get(_url(web, ds), f'multipart/related; type="application/dicom"; '
                                f"transfer-syntax={ts}")
        ((_, body),) = _parts(r)
        out, orig = tmp_path / "out.dcm", tmp_path / "orig.dcm"
        out.write_bytes(body)
        orig.write_bytes(_stored(web, ds))
        assert dcmread(out).file_meta.TransferSyntaxUID == ts
        assert set(dciodvfy_errors(out, tool)) <= set(dciodvfy_errors(orig, tool))


def test_metadata_documents_built_in_background_and_read_from_disk(web: Any) -> None:
    from node.dicomweb.wado import MetadataCache, instance_json
    from storage.query import InstanceRef

    (ct,) = _store(web, "CT_small.dcm")
    warmer = web.node.dicomweb.warmer
    inst = web.node.ctx.index.get_instance(str(ct.SOPInstanceUID))
    disk = web.node.dicomweb.app.state.service.metadata.disk
    for _ in range(200):  # the warmer works once stores pause (0.3 s)
        if disk.has(inst.sha256):
            break
        time.sleep(0.05)
    assert disk.has(inst.sha256) and warmer.built >= 1
    doc = disk.get(inst.sha256)
    assert web.url.encode() not in doc and b"\\u0000base\\u0000" in doc  # URL templated
    # a fresh cache (a restarted node) answers from the document on disk, per host
    web.node.dicomweb.app.state.service.metadata = MetadataCache(disk)
    url = f"{web.url}/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/metadata"
    r = _get(url, None, **{"X-Forwarded-Host": "pacs.example.org", "X-Forwarded-Proto": "https"})
    ref = InstanceRef(str(ct.SOPInstanceUID), str(ct.SOPClassUID), inst.transfer_syntax_uid,
                      str(ct.StudyInstanceUID), str(ct.SeriesInstanceUID), inst.file_path,
                      inst.file_size, inst.sha256)
    expect = instance_json(web.node.ctx.store.path(inst.file_path), ref,
                           "https://pacs.example.org")
    assert r.json() == [expect]
