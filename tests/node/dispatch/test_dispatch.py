"""Dispatch against a real Orthanc on loopback: C-STORE and STOW-RS, policy, retries, ledger."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from audit.events import EventType
from audit.ledger import Ledger
from audit.watermark import WatermarkKey, embed, make_payload
from config.sections.pipeline import Destination
from engine.api import Provenance
from node.db import make_engine, upgrade
from node.dicom.series import SeriesSpec, build_series
from node.dicom.volume import assemble
from node.dispatch.base import DispatchState
from node.dispatch.dimse import DimseSender
from node.dispatch.dispatcher import Dispatcher, watermark_check
from node.dispatch.stow import parse_stow_response
from tests.support.orthanc import OrthancServer
from tests.support.factory import make_series

pytestmark = pytest.mark.orthanc

PROV = Provenance("restoration", "ct-denoise", "1.0", "cd" * 32, {"steps": 1}, 7, "cpu", 1, 0.1)
KEY = WatermarkKey.generate(key_id=3)


def _series(marked: bool = True, n: int = 3, ts: str = ExplicitVRLittleEndian, fmt: str = "sc") -> list[Dataset]:
    src = assemble(make_series(n, rows=256, cols=256))
    mark = (lambda a: embed(a, KEY, make_payload(3, 11), bits_stored=16, signed=False)) if marked else None
    built = build_series(src, src.volume, SeriesSpec(fmt, PROV, transfer_syntax_uid=ts), mark=mark)
    # what a receiver gets: the encoded file read back
    out = []
    for ds in built.datasets:
        from io import BytesIO

        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        buf.seek(0)
        out.append(pydicom.dcmread(buf))
    return out


def _dimse(server: OrthancServer, **kw: object) -> Destination:
    args: dict[str, object] = dict(
        name="pacs", kind="dimse", ae_title=server.aet, host="127.0.0.1", port=server.dicom_port,
        accepts_synthetic=True, max_attempts=3, backoff_s=0.5,
    )
    return Destination(**{**args, **kw})


def _stow(server: OrthancServer, **kw: object) -> Destination:
    args: dict[str, object] = dict(
        name="web", kind="dicomweb", url=server.dicomweb_url, accepts_synthetic=True,
        max_attempts=3, backoff_s=0.5,
    )
    return Destination(**{**args, **kw})


@pytest.fixture
def ledger(sqlite_url: str) -> Ledger:
    upgrade(sqlite_url)
    return Ledger(make_engine(sqlite_url))


def _types(ledger: Ledger) -> list[str]:
    return [e.event.type.value for e in ledger.entries()]


def test_cstore_delivers_with_association_reuse(orthanc: OrthancServer, ledger: Ledger) -> None:
    a, b = _series(), _series()
    d = Dispatcher([_dimse(orthanc)], ledger=ledger, watermark=watermark_check([KEY]))
    r1 = d.send(a, "pacs", job_id="job-1")
    r2 = d.send(b, "pacs")
    assert r1.state is r2.state is DispatchState.SUCCEEDED
    assert r1.attempts == 1
    assert orthanc.instance_uids() == {str(x.SOPInstanceUID) for x in a + b}
    sender = d._senders["pacs"]
    assert isinstance(sender, DimseSender) and sender.associations_opened == 1
    d.close()
    stored = pydicom.dcmread(__import__("io").BytesIO(orthanc.instance_file(str(a[0].SOPInstanceUID))))
    assert stored.SyntheticData == "YES"
    np.testing.assert_array_equal(stored.pixel_array, a[0].pixel_array)
    types = _types(ledger)
    assert types == ["dispatch.attempted", "dispatch.succeeded"] * 2
    ev = ledger.query(event_types=[EventType.DISPATCH_SUCCEEDED])[0].event
    assert ev.subject["job_id"] == "job-1" and ev.subject["destination"] == "pacs"
    assert ev.payload["acknowledged"] == 3


def test_transfer_syntax_fallback(orthanc_factory: Callable[..., OrthancServer]) -> None:
    server = orthanc_factory(extra_config={"RleTransferSyntaxAccepted": False})
    rle = _series(ts=RLELossless)
    assert rle[0].file_meta.TransferSyntaxUID == RLELossless
    d = Dispatcher([_dimse(server)], watermark=watermark_check([KEY]))
    r = d.send(rle, "pacs")
    d.close()
    assert r.state is DispatchState.SUCCEEDED, r
    stored = pydicom.dcmread(__import__("io").BytesIO(server.instance_file(str(rle[0].SOPInstanceUID))))
    assert stored.file_meta.TransferSyntaxUID != RLELossless
    np.testing.assert_array_equal(stored.pixel_array, rle[0].pixel_array)


def test_policy_refuses_synthetic_and_unmarked(orthanc: OrthancServer, ledger: Ledger) -> None:
    no_syn = Destination(name="plain", kind="dimse", ae_title=orthanc.aet, host="127.0.0.1",
                         port=orthanc.dicom_port, accepts_synthetic=False)
    d = Dispatcher([no_syn, _dimse(orthanc)], ledger=ledger, watermark=watermark_check([KEY]))
    r = d.send(_series(), "plain")
    assert r.state is DispatchState.REFUSED and "does not accept synthetic" in r.reason
    r = d.send(_series(marked=False), "pacs")
    assert r.state is DispatchState.REFUSED and "watermark" in r.reason
    other_key = Dispatcher([_dimse(orthanc)], watermark=watermark_check([WatermarkKey.generate(9)]))
    assert other_key.send(_series(), "pacs").state is DispatchState.REFUSED
    assert Dispatcher([_dimse(orthanc)]).send(_series(), "pacs").state is DispatchState.REFUSED
    d.close()
    assert orthanc.instance_uids() == set()
    assert _types(ledger) == ["dispatch.failed", "dispatch.failed"]
    # originals (not synthetic) need no watermark
    original = make_series(2, rows=64, cols=64)
    assert d.send(original, "plain").state is DispatchState.SUCCEEDED
    d.close()


def test_peer_down_then_back_delivered_once(orthanc: OrthancServer, ledger: Ledger) -> None:
    """One attempt per call: the peer is down for two attempts (retry scheduled, nothing
    acknowledged), back for the third, which delivers each instance once."""
    series = _series()
    orthanc.stop()
    dest = _dimse(orthanc, max_attempts=5, backoff_s=1.0)
    d = Dispatcher([dest], ledger=ledger, watermark=watermark_check([KEY]))
    for attempt in (1, 2):
        r = d.send(series, "pacs", attempt=attempt, terminal=False)
        assert r.state is DispatchState.FAILED and r.attempts == 1 and not r.acknowledged
        assert all(f.transient for f in r.failed.values())
    orthanc.start()
    r = d.send(series, "pacs", attempt=3, terminal=False)
    d.close()
    assert r.state is DispatchState.SUCCEEDED and r.attempts == 1
    assert [d.backoff(dest, a) for a in (1, 2, 3)] == [1.0, 2.0, 4.0]  # exponential
    assert orthanc.instance_uids() == {str(x.SOPInstanceUID) for x in series}
    assert orthanc.statistics()["CountInstances"] == len(series)
    assert _types(ledger) == ["dispatch.attempted", "dispatch.failed"] * 2 + [
        "dispatch.attempted", "dispatch.succeeded"]
    states = [e.event.payload["state"]
              for e in ledger.query(event_types=[EventType.DISPATCH_FAILED])]
    assert states == ["retry_scheduled", "retry_scheduled"]


def test_terminal_failure_on_the_last_attempt(orthanc: OrthancServer, ledger: Ledger) -> None:
    orthanc.stop()
    d = Dispatcher([_dimse(orthanc, max_attempts=3, backoff_s=0.25)], ledger=ledger,
                   watermark=watermark_check([KEY]))
    series = _series()
    r = d.send(series, "pacs", attempt=3, terminal=True)
    assert r.state is DispatchState.FAILED and r.attempts == 1
    assert set(r.failed) == {str(x.SOPInstanceUID) for x in series}
    assert _types(ledger) == ["dispatch.attempted", "dispatch.failed"]
    failed = ledger.query(event_types=[EventType.DISPATCH_FAILED])[0].event
    assert failed.payload["state"] == "failed" and failed.payload["attempts"] == 3


def test_no_resend_of_acknowledged(orthanc: OrthancServer) -> None:
    series = _series()
    d = Dispatcher([_dimse(orthanc)], watermark=watermark_check([KEY]))
    done = {str(series[0].SOPInstanceUID)}
    r = d.send(series, "pacs", already_acknowledged=done)
    d.close()
    assert r.state is DispatchState.SUCCEEDED
    assert set(r.acknowledged) == {str(x.SOPInstanceUID) for x in series[1:]}
    assert orthanc.instance_uids() == set(r.acknowledged)


def test_stow_rs_delivers(orthanc_dicomweb: OrthancServer, ledger: Ledger) -> None:
    series = _series(fmt="mf_word_sc") + _series()
    d = Dispatcher([_stow(orthanc_dicomweb)], ledger=ledger, watermark=watermark_check([KEY]))
    r = d.send(series, "web")
    d.close()
    assert r.state is DispatchState.SUCCEEDED, r
    assert orthanc_dicomweb.instance_uids() == {str(x.SOPInstanceUID) for x in series}
    assert _types(ledger) == ["dispatch.attempted", "dispatch.succeeded"]


def test_stow_rs_peer_down_is_transient(orthanc_dicomweb: OrthancServer) -> None:
    series = _series()
    orthanc_dicomweb.stop()
    d = Dispatcher([_stow(orthanc_dicomweb)], watermark=watermark_check([KEY]))
    r = d.send(series, "web", attempt=1, terminal=False)
    assert r.state is DispatchState.FAILED and all(f.transient for f in r.failed.values())
    orthanc_dicomweb.start()
    r = d.send(series, "web", attempt=2, terminal=False)
    d.close()
    assert r.state is DispatchState.SUCCEEDED
    assert orthanc_dicomweb.instance_uids() == {str(x.SOPInstanceUID) for x in series}


def _stow_response(acked: list[str], failed: list[tuple[str, int]]) -> Dataset:
    resp = Dataset()
    resp.ReferencedSOPSequence = []
    for uid in acked:
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        item.ReferencedSOPInstanceUID = uid
        resp.ReferencedSOPSequence.append(item)
    resp.FailedSOPSequence = []
    for uid, code in failed:
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        item.ReferencedSOPInstanceUID = uid
        item.FailureReason = code
        resp.FailedSOPSequence.append(item)
    return resp


def test_stow_202_partial_success_parsed() -> None:
    """PS3.18 10.5.3: a 202 lists stored and failed instances; failures are not successes."""
    series = make_series(4, rows=8, cols=8)
    uids = [str(ds.SOPInstanceUID) for ds in series]
    resp = _stow_response(uids[:2], [(uids[2], 0xA700), (uids[3], 0xC000)])
    rep = parse_stow_response(series, resp, 202)
    assert rep.acknowledged == uids[:2]
    assert rep.failed[uids[2]].transient and rep.failed[uids[2]].status == 0xA700
    assert not rep.failed[uids[3]].transient
    # an instance missing from both lists is not acknowledged
    rep = parse_stow_response(series, _stow_response(uids[:3], []), 202)
    assert rep.failed[uids[3]].transient and uids[3] not in rep.acknowledged


def test_stow_partial_failure_from_real_orthanc(orthanc_dicomweb: OrthancServer) -> None:
    """A batch with an instance Orthanc cannot store: the good ones are acknowledged,
    the bad one is reported failed (202 / FailedSOPSequence), never counted as sent."""
    good = make_series(2, rows=16, cols=16)
    bad = make_series(1, rows=16, cols=16)[0]
    del bad.StudyInstanceUID  # Orthanc refuses instances without Study Instance UID
    dest = _stow(orthanc_dicomweb, max_attempts=1)
    d = Dispatcher([dest])
    r = d.send(good + [bad], "web")
    d.close()
    assert r.state is DispatchState.FAILED
    assert set(r.acknowledged) == {str(x.SOPInstanceUID) for x in good}
    assert str(bad.SOPInstanceUID) in r.failed
    assert orthanc_dicomweb.instance_uids() == set(r.acknowledged)
