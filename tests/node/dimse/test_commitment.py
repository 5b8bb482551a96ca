"""Storage Commitment Push Model SCP (PS3.4 J) with a pynetdicom SCU as the real peer
(DCMTK ships no storage commitment SCU).

The node is asked about instances it holds, one it never received, one held under another
SOP class and one whose stored file was damaged; the N-EVENT-REPORT must confirm exactly
the intact ones and fail the others with the PS3.4 J.3.3.1.1 Failure Reason, on the same
association (default) or on a new association to the requester.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel
from tests.support.dimse import SPECS, get_port, ingest, make_ctx, make_dataset, serve

from audit.events import EventType
from node.dimse.commitment import STORAGE_COMMITMENT_INSTANCE

CT_SPECS = [s for s in SPECS if s.modality == "CT"][:4]


def _request(refs: list[tuple[str, str]], tx: str | None = None) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = tx or generate_uid()
    items = []
    for cls, inst in refs:
        it = Dataset()
        it.ReferencedSOPClassUID = cls
        it.ReferencedSOPInstanceUID = inst
        items.append(it)
    ds.ReferencedSOPSequence = items
    return ds


class Reports:
    """Collects N-EVENT-REPORTs received by the SCU (same or new association)."""

    def __init__(self) -> None:
        self.got: list[tuple[int, Dataset, str]] = []
        self.cond = threading.Condition()

    def handler(self, event: Any) -> tuple[int, None]:
        with self.cond:
            self.got.append((int(event.event_type), event.event_information,
                             "acceptor" if event.assoc.is_acceptor else "requestor"))
            self.cond.notify_all()
        return 0x0000, None

    def wait(self, n: int = 1, timeout: float = 20) -> list[tuple[int, Dataset, str]]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.got) >= n, timeout=timeout)
            return list(self.got)


def _scu(reports: Reports) -> AE:
    ae = AE(ae_title="COMMITSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(StorageCommitmentPushModel)
    return ae


@pytest.fixture
def node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Any, int, int]]:
    """A node holding CT_SPECS (one file damaged); ``scu_port`` = the requester's SCP port."""
    scu_port = get_port()
    mode = getattr(request, "param", "auto")
    ctx = make_ctx(tmp_path, f"sqlite:///{tmp_path / 'index.db'}", commitment_report=mode,
                   move_destinations=[{"ae_title": "COMMITSCU", "host": "127.0.0.1",
                                       "port": scu_port}])
    ingest(ctx, [make_dataset(s) for s in CT_SPECS])
    damaged = ctx.index.get_instance(CT_SPECS[3].sop_uid)
    p = ctx.store.path(damaged.file_path)
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF  # one flipped pixel byte
    p.write_bytes(bytes(data))
    with serve(ctx) as port:
        yield ctx, port, scu_port
    ctx.engine.dispose()


def _refs() -> tuple[list[tuple[str, str]], dict[str, int]]:
    refs = [(CTImageStorage, CT_SPECS[0].sop_uid), (CTImageStorage, CT_SPECS[1].sop_uid),
            (CTImageStorage, "1.2.3.4.5.6.7.8.9"),          # never received
            (MRImageStorage, CT_SPECS[2].sop_uid),          # held, but as CT
            (CTImageStorage, CT_SPECS[3].sop_uid)]          # file damaged
    want_failed = {"1.2.3.4.5.6.7.8.9": 0x0112, CT_SPECS[2].sop_uid: 0x0119,
                   CT_SPECS[3].sop_uid: 0x0110}
    return refs, want_failed


def _ledger_commitments(ctx: Any, n: int = 1, timeout: float = 20) -> list[Any]:
    """STORAGE_COMMITMENT events, waiting for ``n`` (written after the report's response)."""
    end = time.monotonic() + timeout
    while True:
        evs = [e.event for e in ctx.ledger.query(event_types=[EventType.STORAGE_COMMITMENT.value])]
        if len(evs) >= n or time.monotonic() > end:
            return evs
        time.sleep(0.05)


def _check_report(info: Dataset, tx: str, want_failed: dict[str, int]) -> None:
    assert info.TransactionUID == tx
    ok = {(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence}
    assert ok == {(CTImageStorage, CT_SPECS[0].sop_uid), (CTImageStorage, CT_SPECS[1].sop_uid)}
    failed = {i.ReferencedSOPInstanceUID: int(i.FailureReason) for i in info.FailedSOPSequence}
    assert failed == want_failed


def test_report_on_same_association(node: tuple[Any, int, int]) -> None:
    ctx, port, _ = node
    reports = Reports()
    assoc = _scu(reports).associate("127.0.0.1", port, ae_title="SYNTHNODE",
                                    evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)])
    assert assoc.is_established
    refs, want_failed = _refs()
    req = _request(refs)
    status, _ = assoc.send_n_action(req, 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE)
    assert status.Status == 0x0000
    got = reports.wait()
    ev = _ledger_commitments(ctx)[-1]  # written once the report was answered
    assoc.release()
    assert len(got) == 1
    event_type, info, side = got[0]
    assert side == "requestor" and event_type == 2  # failures exist
    _check_report(info, req.TransactionUID, want_failed)
    assert ev.actor == "ae:COMMITSCU" and ev.payload["delivered"] == "same_association"
    assert ev.payload["committed"] == 2 and ev.payload["failed"] == 3
    assert ev.payload["failure_reasons"] == {"0x0110": 1, "0x0112": 1, "0x0119": 1}
    assert CT_SPECS[0].sop_uid in ev.payload["sop_uids"]


def test_all_success_is_event_type_1(node: tuple[Any, int, int]) -> None:
    ctx, port, _ = node
    reports = Reports()
    assoc = _scu(reports).associate("127.0.0.1", port, ae_title="SYNTHNODE",
                                    evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)])
    req = _request([(CTImageStorage, s.sop_uid) for s in CT_SPECS[:3]])
    status, _ = assoc.send_n_action(req, 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE)
    assert status.Status == 0x0000
    (event_type, info, _side), = reports.wait()
    assert _ledger_commitments(ctx)[-1].payload["report_status"] == 0
    assoc.release()
    assert event_type == 1 and "FailedSOPSequence" not in info
    assert len(info.ReferencedSOPSequence) == 3


@pytest.mark.parametrize("node", ["new_association"], indirect=True)
def test_report_on_new_association(node: tuple[Any, int, int]) -> None:
    ctx, port, scu_port = node
    reports = Reports()
    scp = AE(ae_title="COMMITSCU")
    # accept the node proposing itself as SCP of the push model (role selection)
    scp.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    server = scp.start_server(("127.0.0.1", scu_port), block=False,
                              evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)])
    try:
        assoc = _scu(reports).associate("127.0.0.1", port, ae_title="SYNTHNODE")
        refs, want_failed = _refs()
        req = _request(refs)
        status, _ = assoc.send_n_action(req, 1, StorageCommitmentPushModel,
                                        STORAGE_COMMITMENT_INSTANCE)
        assoc.release()  # the requester does not wait on this association
        assert status.Status == 0x0000
        got = reports.wait()
    finally:
        server.shutdown()
    assert len(got) == 1
    event_type, info, side = got[0]
    assert side == "acceptor" and event_type == 2
    _check_report(info, req.TransactionUID, want_failed)
    ev = _ledger_commitments(ctx)[-1]
    assert ev.payload["delivered"] == "new_association" and ev.payload["report_status"] == 0


BAD_REQUESTS = [
    (2, STORAGE_COMMITMENT_INSTANCE, None, 0x0123),  # no such action
    (1, "1.2.3.4", None, 0x0112),                    # not the well-known instance
    (1, STORAGE_COMMITMENT_INSTANCE, "TransactionUID", 0x0120),
    (1, STORAGE_COMMITMENT_INSTANCE, "ReferencedSOPSequence", 0x0120),
]


def test_bad_requests_refused(node: tuple[Any, int, int]) -> None:
    ctx, port, _ = node
    reports = Reports()
    assoc = _scu(reports).associate("127.0.0.1", port, ae_title="SYNTHNODE",
                                    evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)])
    for action_type, instance, drop, status in BAD_REQUESTS:
        req = _request([(CTImageStorage, CT_SPECS[0].sop_uid)])
        if drop:
            delattr(req, drop)
        rsp, _ = assoc.send_n_action(req, action_type, StorageCommitmentPushModel, instance)
        assert rsp.Status == status, (action_type, instance, drop)
    # the node keeps serving on the same association
    ok, _ = assoc.send_n_action(_request([(CTImageStorage, CT_SPECS[0].sop_uid)]), 1,
                                StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE)
    assert ok.Status == 0x0000
    assert [g[0] for g in reports.wait()] == [1]  # refused requests get no report
    evs = _ledger_commitments(ctx, len(BAD_REQUESTS) + 1)
    assoc.release()
    assert [e.payload.get("n_action_status") for e in evs[:len(BAD_REQUESTS)]] == [
        b[3] for b in BAD_REQUESTS]
    assert evs[-1].payload["committed"] == 1
