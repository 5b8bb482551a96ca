"""STOW-RS with dicomweb-client and raw HTTP: the status matrix (PS3.18 10.5.3)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file

from config.sections.dimse import DuplicatePolicy
from tests.support.dicomweb import auth, client, multipart
from tests.support.dimse import SPECS, ledger_events, make_dataset, part10


def _post(url: str, body: bytes | Iterator[bytes], *, ctype: str | None = None,
          token: str = "rw", path: str = "/studies") -> httpx.Response:
    headers = {**auth(token), "Accept": "application/dicom+json",
               "Content-Type": ctype or 'multipart/related; type="application/dicom"; '
                                        'boundary=b0undary'}
    return httpx.post(url + path, content=body, headers=headers, timeout=60)


def _ds(i: int) -> tuple[Dataset, bytes]:
    ds = make_dataset(SPECS[i])
    return ds, part10(ds)


def _seq(body: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return list(body.get(tag, {}).get("Value", []))


def test_all_good_with_dicomweb_client(web: Any) -> None:
    files = [get_testdata_file(f) for f in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm",
                                            "emri_small.dcm")]
    from pydicom import dcmread

    datasets = [dcmread(f) for f in files]
    resp = client(web.url).store_instances(datasets)
    refs = resp.ReferencedSOPSequence
    assert [str(r.ReferencedSOPInstanceUID) for r in refs] == \
        [str(d.SOPInstanceUID) for d in datasets]
    for r, d in zip(refs, datasets, strict=True):
        assert str(r.ReferencedSOPClassUID) == str(d.SOPClassUID)
        assert r.RetrieveURL.startswith(web.url + f"/studies/{d.StudyInstanceUID}/series/")
    assert "FailedSOPSequence" not in resp
    idx = web.node.ctx.index
    assert all(idx.get_instance(str(d.SOPInstanceUID)) for d in datasets)
    received = ledger_events(web.node, "instance.received")  # the C-STORE ingest path
    assert sorted(e.subject["sop_uid"] for e in received) == \
        sorted(str(d.SOPInstanceUID) for d in datasets)
    assert {e.payload["source"] for e in received} == {"stow"}
    assert {e.actor for e in received} == {"token:rw"}  # who stored: the token's name


def test_mixed_is_202_with_failure_reasons(web: Any) -> None:
    _, good = _ds(0)
    truncated = good[: len(good) // 2]  # encoding broken: C000
    bad_ds = make_dataset(SPECS[1])
    del bad_ds.SeriesInstanceUID  # a Type 1 key missing: A900
    bad = part10(bad_ds)
    r = _post(web.url, multipart([good, truncated, bad]))
    assert r.status_code == 202
    assert r.headers["content-type"] == "application/dicom+json"
    body = r.json()
    assert [x["00081155"]["Value"][0] for x in _seq(body, "00081199")] == [SPECS[0].sop_uid]
    failed = _seq(body, "00081198")
    reasons = {x.get("00081155", {}).get("Value", [""])[0]: x["00081197"]["Value"][0]
               for x in failed}
    assert reasons[SPECS[1].sop_uid] == 0xA900
    assert 0xC000 in reasons.values()
    rejected = ledger_events(web.node, "instance.rejected")
    assert len(rejected) == 2 and {e.actor for e in rejected} == {"token:rw"}


def test_all_bad_is_409(web: Any) -> None:
    _, good = _ds(0)
    r = _post(web.url, multipart([good[:100], b"not dicom at all"]))
    assert r.status_code == 409
    assert len(_seq(r.json(), "00081198")) == 2
    assert web.node.ctx.index.count_instances() == 0


@pytest.mark.parametrize("ctype", [
    "application/dicom",
    "multipart/related; type=\"application/dicom+xml\"; boundary=b0undary",
    "multipart/form-data; boundary=b0undary",
    "text/plain",
])
def test_wrong_content_type_is_415(web: Any, ctype: str) -> None:
    _, good = _ds(0)
    r = _post(web.url, multipart([good]), ctype=ctype)
    assert r.status_code == 415
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == 415
    (ev,) = ledger_events(web.node, "instance.rejected")  # bad input: a ledger entry
    assert (ev.actor, ev.payload["status"]) == ("token:rw", 415)


def test_unquoted_parameters_and_chunked_body(web: Any) -> None:
    parts = [_ds(i)[1] for i in range(3)]
    body = multipart(parts, boundary="xyz")

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 777):
            yield body[i:i + 777]

    r = _post(web.url, chunks(), ctype="multipart/related; type=application/dicom; boundary=xyz")
    assert r.status_code == 200, r.text
    assert len(_seq(r.json(), "00081199")) == 3


def test_part_of_another_media_type_fails_that_part_by_name(web: Any) -> None:
    _, good = _ds(0)
    _, other = _ds(1)  # a DICOM file, but labelled as something else
    body = (multipart([good])[:-len(b"--b0undary--\r\n")]
            + multipart([other], part_type="image/jpeg"))
    r = _post(web.url, body)
    assert r.status_code == 202
    body_json = r.json()
    assert [x["00081155"]["Value"][0] for x in _seq(body_json, "00081199")] == \
        [SPECS[0].sop_uid]
    (failed,) = _seq(body_json, "00081198")
    assert failed["00081155"]["Value"] == [SPECS[1].sop_uid]  # named, though not stored
    assert failed["00081197"]["Value"] == [0xC000]
    assert web.node.ctx.index.get_instance(SPECS[1].sop_uid) is None
    rej = ledger_events(web.node, "instance.rejected")
    assert [e.payload["reason"] for e in rej] == ["part_media_type"]


def test_study_mismatch_fails_that_instance(web: Any) -> None:
    _, a = _ds(0)  # study 1
    _, b = _ds(5)  # study 2
    r = _post(web.url, multipart([a, b]), path=f"/studies/{SPECS[0].study_uid}")
    assert r.status_code == 202
    body = r.json()
    assert body["00081190"]["Value"] == [f"{web.url}/studies/{SPECS[0].study_uid}"]
    (failed,) = _seq(body, "00081198")
    assert failed["00081155"]["Value"] == [SPECS[5].sop_uid]
    assert failed["00081197"]["Value"] == [0xA900]
    assert web.node.ctx.index.get_instance(SPECS[5].sop_uid) is None
    rej = ledger_events(web.node, "instance.rejected")
    assert [e.payload["reason"] for e in rej] == ["study_mismatch"]


def test_duplicates_follow_the_dimse_policy(web_factory: Any) -> None:
    web = web_factory()
    ds, data = _ds(0)
    assert _post(web.url, multipart([data])).status_code == 200
    assert _post(web.url, multipart([data])).status_code == 200  # identical: success again
    ds.PatientName = "Other^Content"
    changed = part10(ds)
    web.node.ctx.settings.dimse.duplicate_policy = DuplicatePolicy.REJECT
    r = _post(web.url, multipart([changed]))
    assert r.status_code == 409
    assert _seq(r.json(), "00081198")[0]["00081197"]["Value"] == [0x0111]
    web.node.ctx.settings.dimse.duplicate_policy = DuplicatePolicy.KEEP_FIRST
    r = _post(web.url, multipart([changed]))
    assert r.status_code == 202
    assert _seq(r.json(), "00081199")[0]["00081196"]["Value"] == [0xB006]


def test_body_over_the_limit_is_413(web_factory: Any) -> None:
    web = web_factory(max_request_bytes=1000)
    _, data = _ds(0)
    r = _post(web.url, multipart([data, data]))
    assert r.status_code == 413
    assert r.json()["title"] == "Content Too Large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
        yield multipart([data, data])

    assert _post(web.url, chunks()).status_code == 413
    assert web.node.ctx.index.count_instances() == 0


def test_malformed_multipart_is_400(web: Any) -> None:
    _, data = _ds(0)
    body = multipart([data])[:-20]  # closing boundary lost
    r = _post(web.url, body)
    assert r.status_code == 400


def _json_request(datasets: list[Dataset], absolute: str = "") -> tuple[str, bytes]:
    """A metadata + bulk data STOW-RS body (PS3.18 10.5.1.2): the DICOM JSON array first,
    then one part per bulk data value, named by its Content-Location. Compressed Pixel
    Data goes as its frame's media type with the transfer-syntax parameter."""
    from pydicom.encaps import generate_frames

    bulk: list[bytes] = []

    def add(ds: Dataset) -> Any:
        def handler(elem: Any) -> str:
            uri = f"{absolute}bulk/{ds.SOPInstanceUID}/{elem.tag:08X}"
            ct, value = "application/octet-stream", bytes(elem.value)
            ts = ds.file_meta.TransferSyntaxUID
            if elem.tag == 0x7FE00010 and ts.is_compressed:
                value = next(generate_frames(ds.PixelData, number_of_frames=1))
                ct = f"image/jpeg; transfer-syntax={ts}"
            bulk.append(f"--b0undary\r\nContent-Type: {ct}\r\nContent-Location: {uri}"
                        "\r\n\r\n".encode() + value + b"\r\n")
            return uri
        return handler

    import json

    meta = [ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=add(ds))
            for ds in datasets]
    body = (b"--b0undary\r\nContent-Type: application/dicom+json\r\n\r\n"
            + json.dumps(meta).encode() + b"\r\n" + b"".join(bulk) + b"--b0undary--\r\n")
    return 'multipart/related; type="application/dicom+json"; boundary=b0undary', body


def test_metadata_and_bulk_data(web: Any) -> None:
    """application/dicom+json with bulk data parts: stored through the same ingest path,
    retrieved equal to what was sent (uncompressed and single-frame JPEG)."""
    from pydicom import dcmread
    from pydicom.encaps import generate_frames

    from tests.support.dicomcheck import dciodvfy_errors

    sent = [dcmread(get_testdata_file(f))
            for f in ("CT_small.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm")]
    ctype, body = _json_request(sent, absolute="http://client.example/")
    r = _post(web.url, body, ctype=ctype)
    assert r.status_code == 200, r.text
    assert len(_seq(r.json(), "00081199")) == 2
    c = client(web.url, "reader")
    for ds in sent:
        got = c.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                  ds.SOPInstanceUID, media_types=(("application/dicom", "*"),))
        assert got.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        for elem in ds:
            if elem.tag not in (0xFFFCFFFC, 0x7FE00010):
                assert got[elem.tag].value == elem.value, elem
        if ds.file_meta.TransferSyntaxUID.is_compressed:  # the frame, as sent
            assert list(generate_frames(got.PixelData, number_of_frames=1)) == list(
                generate_frames(ds.PixelData, number_of_frames=1))
        assert (got.pixel_array == ds.pixel_array).all()
        inst = web.node.ctx.index.get_instance(str(ds.SOPInstanceUID))
        assert dciodvfy_errors(web.node.ctx.store.path(inst.file_path)) == []
    # a bulk data part that is missing fails that instance (409: none stored), with the
    # reason in the ledger
    (mr,) = [dcmread(get_testdata_file("MR_small.dcm"))]
    ctype, body = _json_request([mr])
    cut = body.index(b"--b0undary\r\nContent-Type: application/octet-stream")
    r = _post(web.url, body[:cut] + b"--b0undary--\r\n", ctype=ctype)
    assert r.status_code == 409
    (failed,) = _seq(r.json(), "00081198")
    assert failed["00081155"]["Value"] == [str(mr.SOPInstanceUID)]
    assert failed["00081197"]["Value"] == [0xC000]
    ev = ledger_events(web.node, "instance.rejected")[-1]
    assert ev.payload["reason"] == "json_invalid"
    assert "Content-Location" in ev.payload["detail"]
    # no metadata part, or metadata that is not JSON: 400
    bad = _post(web.url, multipart([b"x"], part_type="application/octet-stream"), ctype=ctype)
    assert bad.status_code == 400 and "application/dicom+json" in bad.json()["detail"]
    bad = _post(web.url, multipart([b"[{"], part_type="application/dicom+json"), ctype=ctype)
    assert bad.status_code == 400 and "not JSON" in bad.json()["detail"]
