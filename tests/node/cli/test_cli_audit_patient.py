"""`synthnode audit patient` end to end: real CT and MR files sent with DCMTK storescu to a
running node, a derived synthetic series and its pipeline events, the synthetic series
retrieved with getscu (C-GET) and movescu (C-MOVE to a DCMTK storescp), a findscu query;
then every study, derivation, delivery and retrieval of one patient, by keyed digest, with
proofs; the other patient's data stays out; the ledger holds no Patient ID or name."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
import tomli_w
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from tests.support.dimse import dcmtk, dcmtk_storescp, run_tool
from typer.testing import CliRunner

from audit import merkle
from audit.events import Event, EventType
from node.cli import app
from node.ingest.ingestor import Ingestor

runner = CliRunner()
CT = Path(get_testdata_file("CT_small.dcm"))  # patient 1CT1, CompressedSamples^CT1
MR = Path(get_testdata_file("MR_small.dcm"))  # patient 4MR1


def _synthetic_copy(src: Path, series: str) -> bytes:
    """A derived series of ``src``'s study, stored as the pipeline stores its outputs."""
    from io import BytesIO

    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SyntheticData = "YES"
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _pipeline_events(ctx: Any, study: str, source: str, out: str, sops: list[str]) -> None:
    """The events an engine job and its dispatch record (subjects as node/pipeline writes
    them; the patient digests come from the node's ledger hook)."""
    job = {"job_id": "job-ct-1", "study_uid": study, "model_id": "ct-denoise-wreg"}
    run = {"kind": "engine", "task": "ct_denoise", "source_series_uids": [source]}
    done = {**run, "model_id": "ct-denoise-wreg", "model_version": "1.4.0",
            "weights_sha256": "ab" * 32}
    ctx.ledger.append_many([
        Event(EventType.JOB_QUEUED, "component:pipeline", subject=job, payload=run),
        Event(EventType.JOB_STARTED, "component:worker", subject=job, payload=run),
        Event(EventType.JOB_FINISHED, "component:worker", subject=job, payload=done),
        Event(EventType.OUTPUT_CREATED, "component:worker", subject={**job, "series_uid": out},
              payload={"source_series_uids": [source], "output_series_uid": out,
                       "output_sop_uids": sops, "output_format": "sc",
                       "watermark_payload": "00ff00ff00ff"}),
        Event(EventType.DISPATCH_SUCCEEDED, "component:dispatch",
              subject={"series_uid": out, "study_uid": study, "destination": "PACS",
                       "job_id": "dispatch-1"},
              payload={"sop_uids": sops, "acknowledged": len(sops)}),
    ])


@pytest.mark.dcmtk
def test_audit_patient_end_to_end(start_node: Any, tmp_path: Path) -> None:
    with dcmtk_storescp(tmp_path / "moved") as scp_port:
        node = start_node(dimse={"move_destinations": [
            {"ae_title": "STORESCP", "host": "127.0.0.1", "port": scp_port}]})
        ctx = node.ctx
        port = node.address[1]
        aec = ["-aec", "SYNTHNODE", "127.0.0.1", str(port)]
        r = run_tool([dcmtk("storescu"), "-aet", "STORESCU", *aec, str(CT), str(MR)])
        assert r.returncode == 0, r.stdout
        ct = pydicom.dcmread(CT, stop_before_pixels=True)
        study, source = str(ct.StudyInstanceUID), str(ct.SeriesInstanceUID)
        out = generate_uid()
        stored = Ingestor(ctx).ingest_part10(_synthetic_copy(CT, out), source="engine")
        _pipeline_events(ctx, study, source, out, [stored.sop_instance_uid])

        (tmp_path / "got").mkdir()
        get = run_tool([dcmtk("getscu"), "-S", "-aet", "GETSCU", "-k", "QueryRetrieveLevel=SERIES",
                        "-k", f"StudyInstanceUID={study}", "-k", f"SeriesInstanceUID={out}",
                        "-od", str(tmp_path / "got"), *aec])
        assert len(list((tmp_path / "got").iterdir())) == 1, get.stdout
        move = run_tool([dcmtk("movescu"), "-S", "-aet", "MOVESCU", "-aem", "STORESCP",
                         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                         *aec])
        assert move.returncode == 0, move.stdout
        find = run_tool([dcmtk("findscu"), "-S", "-aet", "FINDSCU", "-k",
                         "QueryRetrieveLevel=STUDY", "-k", "PatientID=1CT1", "-k",
                         "StudyInstanceUID", *aec])
        assert find.returncode == 0, find.stdout

    cfg = tmp_path / "same.toml"
    cfg.write_bytes(tomli_w.dumps({"environment": "development",
                                   "data_dir": str(ctx.settings.data_dir)}).encode())
    assert runner.invoke(app, ["audit", "checkpoint", "-c", str(cfg)]).exit_code == 0
    r = runner.invoke(app, ["audit", "patient", "1CT1", "--json", "--proof", "-c", str(cfg)])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)

    (s,) = rep["studies"]  # the CT patient's one study; the MR patient's stays out
    assert s["study_uid"] == study
    tree = s["lineage"]
    assert [x["series_uid"] for x in tree["sources"]] == [source]
    assert tree["sources"][0]["from"] == "ae:STORESCU"
    (job,) = tree["jobs"]
    assert (job["task"], job["model_id"], job["model_version"], job["weights_sha256"]) == (
        "ct_denoise", "ct-denoise-wreg", "1.4.0", "ab" * 32)
    (output,) = job["outputs"]
    assert output["series_uid"] == out
    assert [(d["destination"], d["type"]) for d in output["dispatches"]] == [
        ("PACS", "dispatch.succeeded")]
    got = {(x["service"], x["actor"], x.get("destination")): x for x in output["retrievals"]}
    assert set(got) == {("C-GET", "ae:GETSCU", None), ("C-MOVE", "ae:MOVESCU", "STORESCP")}
    assert all(x["instances"] == 1 and x["status"] == 0 for x in got.values())
    services = [a["service"] for a in rep["accesses"]]
    assert "C-FIND" in services  # who was shown this patient in a query result
    mr_study = str(pydicom.dcmread(MR, stop_before_pixels=True).StudyInstanceUID)
    ledger = ctx.ledger
    shown = {e.seq: e for e in ledger.entries() if e.seq in set(rep["entries"])}
    assert not any(e.event.subject.get("study_uid") == mr_study for e in shown.values())

    # every entry shown has an inclusion proof that verifies against the signed checkpoint
    proofs = rep["proofs"]
    cp = proofs["checkpoint"]
    assert set(map(int, proofs["entries"])) == set(rep["entries"])
    for seq, p in proofs["entries"].items():
        assert p["signed"] and p["tree_size"] == cp["tree_size"]
        merkle.verify_inclusion(int(seq), p["tree_size"], bytes.fromhex(p["leaf_hash"]),
                                [bytes.fromhex(h) for h in p["proof"]],
                                bytes.fromhex(cp["root_hash"]))

    # the text form: one line per fact, each with its ledger entry number
    text = runner.invoke(app, ["audit", "patient", "1CT1", "--no-record", "-c", str(cfg)]).output
    assert f"output series {out}" in text and "model ct-denoise-wreg 1.4.0" in text
    assert "retrieved: #" in text and "C-MOVE by ae:MOVESCU to STORESCP" in text
    assert "C-FIND by ae:FINDSCU" in text
    # `audit lineage` of the synthetic series shows its retrievals too
    lin = runner.invoke(app, ["audit", "lineage", out, "-c", str(cfg)]).output
    assert "C-GET by ae:GETSCU" in lin and "C-MOVE by ae:MOVESCU" in lin

    # the search itself is audited, and the ledger holds no PHI
    (queried,) = ledger.query(event_types=[EventType.AUDIT_QUERIED.value])
    assert queried.event.subject["patient"] == rep["digests"][0]
    blob = b"".join(e.data for e in ledger.entries())
    for phi in (b"1CT1", b"4MR1", b"CompressedSamples"):
        assert phi not in blob
    # the patient digest is keyed: another key finds nothing
    other = tmp_path / "other.key"
    from audit.patient import load_or_create_patient_key

    load_or_create_patient_key(other)
    r = runner.invoke(app, ["audit", "patient", "1CT1", "--key", str(other), "--json",
                            "--no-record", "-c", str(cfg)])
    assert r.exit_code == 0 and json.loads(r.output)["entries"] == []
