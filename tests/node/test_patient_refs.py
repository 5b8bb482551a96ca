"""The ledger hook that adds keyed patient digests (node/patients.py) to events naming a
study, several studies, or (storage commitment) only SOP Instance UIDs."""
from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from audit.events import Event, EventType
from config.settings import load_settings
from node.app import build_context
from node.ingest.ingestor import Ingestor
from tests.support.dimse import node_settings_dict
from tests.support.net import get_port


def test_hook_adds_digests_from_the_index(tmp_path: Path) -> None:
    ctx = build_context(load_settings(None, **node_settings_dict(tmp_path / "n", get_port())))
    try:
        ing = Ingestor(ctx)
        files = [Path(get_testdata_file(f)) for f in ("CT_small.dcm", "MR_small.dcm")]
        stored = [ing.ingest_part10(f.read_bytes(), calling_ae="CT01") for f in files]
        ct, mr = (pydicom.dcmread(f, stop_before_pixels=True) for f in files)
        d = ctx.patients.digester  # type: ignore[union-attr]
        want_ct, want_mr = d.patient("1CT1", ""), d.patient("4MR1", "")
        received = [e.event for e in ctx.ledger.query(event_types=["instance.received"])]
        assert [e.subject["patient"] for e in received] == [want_ct, want_mr]

        ledger = ctx.ledger
        one = ledger.append(Event(EventType.JOB_QUEUED, "component:pipeline",
                                  subject={"job_id": "j", "study_uid": str(ct.StudyInstanceUID)}))
        both = ledger.append(Event(EventType.RETRIEVE, "ae:MOVESCU", payload={
            "study_uids": [str(ct.StudyInstanceUID), str(mr.StudyInstanceUID)]}))
        commit = ledger.append(Event(EventType.STORAGE_COMMITMENT, "ae:CT01", payload={
            "sop_uids": [stored[1].sop_instance_uid]}))
        unknown = ledger.append(Event(EventType.JOB_QUEUED, "component:pipeline",
                                      subject={"job_id": "k", "study_uid": "1.2.3.4"}))
        assert ledger.entry(one.seq).event.subject["patient"] == want_ct
        assert ledger.entry(both.seq).event.payload["patients"] == sorted([want_ct, want_mr])
        assert ledger.entry(commit.seq).event.subject["patient"] == want_mr
        assert "patient" not in ledger.entry(unknown.seq).event.subject
        # found through the ledger's UID index
        assert {e.seq for e in ledger.query(uids=[want_mr])} >= {both.seq, commit.seq}
    finally:
        ctx.engine.dispose()
