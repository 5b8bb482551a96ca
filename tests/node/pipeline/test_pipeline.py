"""Pipeline stages wired on a real node context (file store, index, ledger) and a real Orthanc.

The engine runner here is the project's non-local-means restoration baseline
(``engine.research.baselines``), a real Volume -> Volume method, so routing, jobs, quality gate,
series building, watermarking, storing and dispatch are exercised without a trained model.
The gated diffusion runner is covered where approved models exist.
"""
from __future__ import annotations

import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest

from audit.watermark import WatermarkKey, detect, payload_hex
from config.settings import load_settings
from engine.api import Provenance, TaskResult, Volume
from engine.research.baselines import nlm_ct
from node.app import build_context
from node.ingest.ingestor import Ingestor
from node.pipeline.jobs import JobKind, JobState
from node.pipeline.orchestrator import Pipeline, mark_id_for
from tests.support.net import require_tool
from tests.support.orthanc import OrthancServer
from tests.support.dicomcheck import dciodvfy_errors
from tests.support.factory import make_series

pytestmark = pytest.mark.orthanc


def nlm_runner(task: str, volume: Volume, params: dict, seed: int, model: str | None) -> TaskResult:
    t0 = time.perf_counter()
    out = nlm_ct()(volume)
    prov = Provenance(task=task, model_id="baseline-nlm", model_version="1",
                      weights_sha256="0" * 64, parameters=params, seed=seed, device="cpu",
                      steps=1, seconds=time.perf_counter() - t0)
    return TaskResult([out], prov)


def _node(tmp_path: Path, orthanc: OrthancServer, reprocess: str = "replace"):
    settings = load_settings(None, environment="development", data_dir=str(tmp_path / "node"), pipeline={
        "quiet_period_s": 3600, "reprocess": reprocess,
        "destinations": [{"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet,
                          "host": "127.0.0.1", "port": orthanc.dicom_port,
                          "accepts_synthetic": True, "max_attempts": 3, "backoff_s": 0.1}],
        "rules": [{"name": "ct", "match": {"modality": "CT", "calling_ae": "CT_SCANNER"},
                   "tasks": [{"task": "ct_denoise", "params": {"strength": 1},
                              "output_format": "mf_word_sc"}],
                   "destinations": ["pacs"]}],
    })
    ctx = build_context(settings, fsync=False)
    key = WatermarkKey.generate(key_id=4)
    pipeline = Pipeline.from_context(ctx, runner=nlm_runner, mark_key=key)
    return ctx, pipeline, key


def _send(ctx, datasets, calling_ae: str = "CT_SCANNER") -> None:
    ing = Ingestor(ctx)
    for ds in datasets:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        ing.ingest_part10(buf.getvalue(), calling_ae=calling_ae, called_ae="SYNTHNODE", source="dimse")


def test_study_to_pacs(tmp_path: Path, orthanc: OrthancServer) -> None:
    tool = require_tool("dciodvfy")
    ctx, pipe, key = _node(tmp_path, orthanc)
    series = make_series(4, rows=256, cols=256)
    study = str(series[0].StudyInstanceUID)
    _send(ctx, series)
    st = pipe.tracker.status(study)
    assert st is not None and st.state == "open" and st.instances == 4
    assert pipe.complete_study(study) is True
    engine_jobs = pipe.jobs.list(kind="engine")
    assert len(engine_jobs) == 1 and engine_jobs[0].state is JobState.QUEUED
    assert pipe.pool.drain() == 2  # engine job, then its dispatch job
    jobs = {j.kind: j for j in pipe.jobs.list()}
    assert jobs[JobKind.ENGINE].state is JobState.SUCCEEDED
    assert jobs[JobKind.DISPATCH].state is JobState.SUCCEEDED, jobs[JobKind.DISPATCH].error
    (out_series,) = jobs[JobKind.ENGINE].result["outputs"]
    # stored in the node (indexed, queryable) and delivered to Orthanc
    stored = ctx.index.instances(series_instance_uid=out_series)
    assert len(stored) == 1
    assert orthanc.instance_uids() == {stored[0].sop_instance_uid}
    got = pydicom.dcmread(BytesIO(orthanc.instance_file(stored[0].sop_instance_uid)))
    assert got.SyntheticData == "YES" and got.StudyInstanceUID == study
    assert got.SeriesDescription.startswith("SYNTHETIC")
    assert got.ContributingEquipmentSequence[0].ManufacturerModelName == "baseline-nlm"
    p = tmp_path / "got.dcm"
    got.save_as(p, enforce_file_format=True)
    assert dciodvfy_errors(p, tool) == []
    det = detect(got.pixel_array, [key])
    assert det.marked and det.payload is not None
    assert payload_hex(det.payload)[-10:] == f"{mark_id_for(out_series):010x}"
    # ledger lineage: source instances -> study completed -> job -> output -> dispatch
    types = [e.event.type.value for e in ctx.ledger.entries()]
    for t in ("instance.received", "study.completed", "job.queued", "job.started",
              "output.created", "job.finished", "dispatch.attempted", "dispatch.succeeded"):
        assert t in types, t
    created = [e.event for e in ctx.ledger.entries() if e.event.type.value == "output.created"][0]
    assert created.payload["watermark_payload"] == payload_hex(det.payload)
    # verified at build as dispatch checks it; CT output keeps the 4 HU bound (default)
    assert created.payload["watermark_verified"] is True
    assert created.payload["watermark_max_delta"] == 4
    assert created.payload["watermark_format"] == 2
    assert created.payload["watermark_bound"] == {"unit": "HU", "max_change": 4}
    fid = created.payload["watermark_fidelity"]
    assert fid["max_change_hu"] <= 4 and fid["max_change_stored"] <= 4 and float(fid["psnr_db"]) > 50
    # a perceptual fingerprint per output slice: the leaked PNG of the output is found by it
    from audit.watermark.fingerprint import FingerprintIndex
    from tests.support.watermark_transforms import window8

    fps = created.payload["fingerprints"]
    frames = got.pixel_array.reshape(-1, got.Rows, got.Columns)
    assert fps["scheme"] == "dctr1" and len(fps["slices"]) == len(frames) == 4
    assert all(len(h) == 4 for h in fps["slices"])  # stored values + 3 CT windows
    index = FingerprintIndex()
    assert index.add_event(7, created.payload) == 4
    hu = frames[2] * float(got.RescaleSlope) + float(got.RescaleIntercept)
    (best,) = index.search(window8(hu, -600, 1500), k=1)  # a lung-window rendering
    assert best.distance <= 20 and best.series_uid == out_series and best.seq == 7
    assert best.sop_uid == stored[0].sop_instance_uid
    assert created.payload["source_series_uids"] == [str(series[0].SeriesInstanceUID)]
    # completing again, or the synthetic series coming back, queues nothing
    assert pipe.complete_study(study) is False
    _send(ctx, [got], calling_ae="PACS")
    assert pipe.tracker.status(study).state == "complete"  # synthetic instance: not re-opened
    assert pipe.on_study_complete(study, 0) == []  # fingerprint: already processed
    pipe.stop()


def test_late_instance_replace_policy_and_held_output(tmp_path: Path, orthanc: OrthancServer) -> None:
    ctx, pipe, key = _node(tmp_path, orthanc, reprocess="replace")
    series = make_series(5, rows=256, cols=256, shuffle=False)
    study = str(series[0].StudyInstanceUID)
    _send(ctx, series[:4])
    pipe.complete_study(study)
    pipe.pool.drain()
    first = pipe.jobs.list(kind="engine")[0].result["outputs"][0]
    _send(ctx, series[4:])  # late instance re-opens the study
    assert pipe.tracker.status(study).generation == 1
    pipe.complete_study(study)
    pipe.pool.drain()
    engine_jobs = pipe.jobs.list(kind="engine")
    assert len(engine_jobs) == 2 and all(j.state is JobState.SUCCEEDED for j in engine_jobs)
    from sqlalchemy import select

    from node.pipeline.tables import outputs

    with ctx.engine.connect() as c:
        rows = {r.series_uid: r for r in c.execute(select(outputs))}
    assert rows[first].superseded is True
    assert len(rows) == 2 and sum(not r.superseded for r in rows.values()) == 1

    # a runner whose output is broken is held back by the quality gate
    def held_job(corrupt):  # type: ignore[no-untyped-def]
        """Run a new 3-slice study through a runner that corrupts the NLM output in place;
        the job succeeds with no output released."""
        def runner(task, volume, params, seed, model):  # type: ignore[no-untyped-def]
            r = nlm_runner(task, volume, params, seed, model)
            bad = r.outputs[0].data.copy()
            corrupt(bad)
            return TaskResult([Volume(bad, volume.spacing, volume.intensity)], r.provenance)

        pipe.runner = runner
        series = make_series(3, rows=256, cols=256)
        _send(ctx, series)
        pipe.complete_study(str(series[0].StudyInstanceUID))
        pipe.pool.drain()
        job = pipe.jobs.list(study_uid=str(series[0].StudyInstanceUID))[0]
        assert job.state is JobState.SUCCEEDED and job.result["outputs"] == []
        return job

    def all_nan(a):  # type: ignore[no-untyped-def]
        a[:] = np.nan

    job = held_job(all_nan)
    assert "non-finite" in job.result["held"][0]["reasons"][0]
    assert job.result["held"][0]["checks"] == ["non_finite"]
    assert "output.held" in [e.event.type.value for e in ctx.ledger.entries()]

    # a slice-local failure (one slice of 3 is 75 HU off: over the per-slice limit of 50 HU,
    # while the volume's mean residual, 25 HU, stays under its 30 HU) is held back too, and
    # the ledger says which check and which slice
    def one_slice_off(a):  # type: ignore[no-untyped-def]
        a[1] += 75.0

    job = held_job(one_slice_off)
    assert "slice_bias" in job.result["held"][0]["checks"]
    assert "bias" not in job.result["held"][0]["checks"]
    (held,) = [e.event for e in ctx.ledger.entries() if e.event.type.value == "output.held"
               and e.event.subject["job_id"] == job.id]
    assert held.outcome.value == "minor_failure" and held.subject["model_id"] == "baseline-nlm"
    assert "slice_bias" in held.payload["checks"]
    assert any("1 slice(s) (1)" in r for r in held.payload["reasons"]), held.payload["reasons"]
    assert held.payload["stats"]["slice_residual_mean_worst"] == "1"
    assert not [e for e in ctx.ledger.entries() if e.event.type.value == "output.created"
                and e.event.subject["job_id"] == job.id]
    pipe.stop()


def test_dispatch_job_retries_until_peer_is_back(tmp_path: Path, orthanc: OrthancServer) -> None:
    ctx, pipe, key = _node(tmp_path, orthanc)
    series = make_series(3, rows=256, cols=256)
    study = str(series[0].StudyInstanceUID)
    _send(ctx, series)
    pipe.complete_study(study)
    assert pipe.pool.run_once()  # engine job only
    orthanc.stop()
    assert pipe.pool.run_once()  # dispatch attempt 1 fails: requeued with backoff
    job = pipe.jobs.list(kind="dispatch")[0]
    assert job.state is JobState.QUEUED and job.attempts == 1 and "association" in (job.error or "")
    orthanc.start()
    time.sleep(0.2)  # backoff 0.1 s
    assert pipe.pool.run_once()
    job = pipe.jobs.get(job.id)
    assert job.state is JobState.SUCCEEDED and job.attempts == 2
    assert orthanc.statistics()["CountInstances"] == 1  # delivered once
    ev = [e.event.payload.get("state") for e in ctx.ledger.entries()
          if e.event.type.value == "dispatch.failed"]
    assert ev == ["retry_scheduled"]
    pipe.stop()
