"""Held and refused outputs are first-class outcomes: an output whose watermark the node could
not verify is stored and recorded but never dispatched, and the job says why; a quality-held
output is named with its failed checks; both show in the jobs CLI and can be released or
discarded by an administrator, recorded in the ledger with who and why."""
from __future__ import annotations

import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from audit.export import lineage
from audit.watermark import WatermarkKey
from config.settings import load_settings
from engine.api import Provenance, TaskResult, Volume
from engine.research.baselines import nlm_ct
from node.app import build_context
from node.cli import app
from node.ingest.ingestor import Ingestor
from node.pipeline.jobs import JobKind, JobState
from node.pipeline.orchestrator import Pipeline
from node.pipeline.tables import outputs
from tests.support.factory import make_series
from tests.support.net import get_port


def nlm_runner(task: str, volume: Volume, params: dict, seed: int,
               model: str | None) -> TaskResult:
    t0 = time.perf_counter()
    out = nlm_ct()(volume)
    prov = Provenance(task=task, model_id="baseline-nlm", model_version="1",
                      weights_sha256="0" * 64, parameters=params, seed=seed, device="cpu",
                      steps=1, seconds=time.perf_counter() - t0)
    return TaskResult([out], prov)


def broken_runner(task: str, volume: Volume, params: dict, seed: int,
                  model: str | None) -> TaskResult:
    res = nlm_runner(task, volume, params, seed, model)
    data = res.outputs[0].data + np.float32(300.0)  # every slice +300 HU: held
    return TaskResult([Volume(data, volume.spacing, volume.intensity)], res.provenance)


def node(tmp_path: Path, runner, **kwargs):  # type: ignore[no-untyped-def]
    settings = load_settings(None, environment="development",
                             data_dir=str(tmp_path / "node"), pipeline={
        "quiet_period_s": 3600,
        "destinations": [{"name": "pacs", "kind": "dimse", "ae_title": "PACS",
                          "host": "127.0.0.1", "port": get_port(),
                          "accepts_synthetic": True, "max_attempts": 1, "backoff_s": 0.1}],
        "rules": [{"name": "ct", "match": {"modality": "CT"},
                   "tasks": [{"task": "ct_denoise", "output_format": "sc"}],
                   "destinations": ["pacs"]}],
    })
    ctx = build_context(settings, fsync=False)
    return ctx, Pipeline.from_context(ctx, runner=runner, **kwargs)


def send(ctx, datasets) -> str:  # type: ignore[no-untyped-def]
    ing = Ingestor(ctx)
    for ds in datasets:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        ing.ingest_part10(buf.getvalue(), calling_ae="CT", called_ae="SYNTHNODE",
                          source="dimse")
    return str(datasets[0].StudyInstanceUID)


def test_unverified_watermark_is_never_dispatched(tmp_path: Path) -> None:
    # the node marks with one key but can only verify with another: no mark verifies
    ctx, pipe = node(tmp_path, nlm_runner, mark_key=WatermarkKey.generate(key_id=4),
                     detect_keys=[WatermarkKey.generate(key_id=5)])
    study = send(ctx, make_series(2, rows=64, cols=64))
    assert pipe.complete_study(study)
    assert pipe.pool.drain() == 1  # the engine job only: no dispatch job queued
    (job,) = pipe.jobs.list()
    assert job.kind is JobKind.ENGINE and job.state is JobState.SUCCEEDED
    assert job.result["outcome"] == "refused"
    (refused,) = job.result["refused"]
    assert refused["checks"] == ["watermark_unverified"]
    assert "never dispatched" in refused["reasons"][0]
    assert not pipe.jobs.list(kind="dispatch")
    with ctx.engine.connect() as c:
        (row,) = c.execute(outputs.select()).all()
    assert row.held and row.series_uid == refused["series_uid"]
    held = [e.event for e in ctx.ledger.entries() if e.event.type.value == "output.held"]
    assert held and held[0].payload["checks"] == ["watermark_unverified"]
    created = [e.event for e in ctx.ledger.entries() if e.event.type.value == "output.created"]
    assert created[0].payload["watermark_verified"] is False
    # such an output cannot be released, only discarded (removed from the node), once
    with pytest.raises(ValueError, match="never dispatched"):
        pipe.release(job.id, by="bob", reason="looks fine")
    assert pipe.discard(job.id, by="alice", reason="mark unreadable") == [row.series_uid]
    assert ctx.index.instances(series_instance_uid=row.series_uid) == []
    (gone,) = [e.event for e in ctx.ledger.entries()
               if e.event.type.value == "output.discarded"]
    assert gone.actor == "user:alice" and gone.payload["reason"] == "mark unreadable"
    assert pipe.jobs.get(job.id).result["decision"]["action"] == "discarded"
    with pytest.raises(ValueError, match="already discarded by alice"):
        pipe.discard(job.id, by="alice", reason="again")
    tree = lineage(ctx.ledger, study)
    (ej,) = [j for j in tree["jobs"] if j["job_id"] == job.id]
    assert ej["held"][0]["checks"] == ["watermark_unverified"]
    assert ej["discarded"][0]["actor"] == "user:alice"
    pipe.stop()


def test_quality_hold_is_the_job_outcome(tmp_path: Path) -> None:
    ctx, pipe = node(tmp_path, broken_runner, mark_key=WatermarkKey.generate(key_id=4))
    study = send(ctx, make_series(2, rows=256, cols=256))
    assert pipe.complete_study(study)
    assert pipe.pool.drain() == 1
    (job,) = pipe.jobs.list()
    assert job.result["outcome"] == "held"
    assert "bias" in job.result["held"][0]["checks"]
    assert job.result["outputs"] == []
    # the administrator sees it in the CLI and releases it, recorded with who and why
    cfg = tmp_path / "same.toml"
    cfg.write_text(f'environment = "development"\ndata_dir = "{ctx.settings.data_dir}"\n')
    text = CliRunner().invoke(app, ["jobs", "list", "--wide", "-c", str(cfg)]).output
    assert "held" in text and f"{job.id[:8]} held: bias" in text
    res = CliRunner().invoke(app, ["jobs", "release", job.id[:8], "--reason", "reviewed: the "
                                   "offset is the scanner's calibration", "--by", "bob",
                                   "-c", str(cfg)])
    assert res.exit_code == 0, res.output
    n = pipe.pool.drain()  # the release job builds it; its dispatch job runs (and
    new = next(j for j in pipe.jobs.list(kind="engine") if j.id != job.id)  # fails: no peer)
    assert new.state is JobState.SUCCEEDED and len(new.result["outputs"]) == 1
    assert new.result["outcome"] == "passed" and n == 2
    assert new.result["quality_released"]["by"] == "bob"
    assert "bias" in new.result["quality_released"]["outputs"][0]["checks"]
    assert pipe.jobs.list(kind="dispatch")
    (rel,) = [e.event for e in ctx.ledger.entries() if e.event.type.value == "output.released"]
    assert rel.actor == "user:bob" and rel.payload["new_job_id"] == new.id
    created = [e.event for e in ctx.ledger.entries() if e.event.type.value == "output.created"]
    assert created[0].payload["quality_released_by"] == "bob"
    text = CliRunner().invoke(app, ["jobs", "list", "--wide", "-c", str(cfg)]).output
    assert "held -> released" in text
    pipe.stop()


def test_rerun_gives_the_same_output_uids(tmp_path: Path) -> None:
    series = make_series(2, rows=64, cols=64)
    got = []
    for run in ("a", "b"):
        ctx, pipe = node(tmp_path / run, nlm_runner, mark_key=WatermarkKey.generate(key_id=4))
        study = send(ctx, series)
        assert pipe.complete_study(study)
        pipe.pool.drain()
        (job,) = pipe.jobs.list(kind="engine")
        (out,) = job.result["outputs"]
        got.append((out, sorted(i.sop_instance_uid
                                for i in ctx.index.instances(series_instance_uid=out))))
        pipe.stop()
    assert got[0] == got[1] and len(got[0][1]) == 2
    # another parameter (or model, seed, source) gives other UIDs
    from node.pipeline.orchestrator import output_series_uid, output_uid_seed

    prov = Provenance(task="ct_denoise", model_id="m", model_version="1", weights_sha256="0",
                      parameters={"strength": 0.3}, seed=1, device="cpu", steps=1, seconds=0.0)
    other = Provenance(**{**prov.__dict__, "parameters": {"strength": 0.4}})
    ctx, pipe = node(tmp_path / "c", nlm_runner)
    send(ctx, series)
    pipe.complete_study(str(series[0].StudyInstanceUID))
    (job,) = pipe.jobs.list(kind="engine")
    a = output_series_uid(output_uid_seed(job, prov, 0))
    assert a != output_series_uid(output_uid_seed(job, other, 0))
    assert a != output_series_uid(output_uid_seed(job, prov, 1))
    assert a == output_series_uid(output_uid_seed(job, prov, 0))
    pipe.stop()


def test_study_show_and_reprocess(tmp_path: Path) -> None:
    ctx, pipe = node(tmp_path, nlm_runner, mark_key=WatermarkKey.generate(key_id=4))
    study = send(ctx, make_series(2, rows=256, cols=256))
    assert pipe.complete_study(study)
    assert pipe.pool.drain() == 2  # engine job; its dispatch job fails (no peer, 1 attempt)
    rep = pipe.study_report(study)
    assert rep["state"] == "complete" and rep["instances"] == 2
    (s,) = rep["series"]
    assert s["rule"] == "ct" and s["modality"] == "CT"
    (j,) = rep["jobs"]
    assert j["outcome"] == "passed"
    (o,) = j["outputs"]
    assert o["destinations"]["pacs"]["state"] == "failed" and o["destinations"]["pacs"]["why"]
    cfg = tmp_path / "same.toml"  # the node's configuration, rules included
    dest = ctx.settings.pipeline.destinations[0]
    cfg.write_text(
        f'environment = "development"\ndata_dir = "{ctx.settings.data_dir}"\n'
        "[pipeline]\nquiet_period_s = 3600\n"
        "[[pipeline.destinations]]\n"
        f'name = "pacs"\nkind = "dimse"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
        f"port = {dest.port}\naccepts_synthetic = true\nmax_attempts = 1\n"
        "[[pipeline.rules]]\n"
        'name = "ct"\nmatch = { modality = "CT" }\ndestinations = ["pacs"]\n'
        'tasks = [{ task = "ct_denoise", output_format = "sc" }]\n')
    text = CliRunner().invoke(app, ["study", "show", study, "-c", str(cfg)]).output
    assert "-> rule ct" in text and "outcome passed" in text and "pacs: failed" in text
    # re-routing the stored study: recorded with who and why; the unchanged job gives the
    # same output UIDs and builds nothing new
    res = CliRunner().invoke(app, ["study", "reprocess", study, "--reason", "rule fixed",
                                   "--by", "carol", "-c", str(cfg)])
    assert res.exit_code == 0 and "1 engine job(s) queued" in " ".join(res.output.split())
    (ev,) = [e.event for e in ctx.ledger.entries() if e.event.type.value == "study.reopened"]
    assert ev.actor == "user:carol" and ev.payload["reason"] == "rule fixed"
    pipe.pool.drain()
    new = next(x for x in pipe.jobs.list(kind="engine") if x.id != j["job_id"])
    assert new.state is JobState.SUCCEEDED and new.result["unchanged"] == [o["series_uid"]]
    with ctx.engine.connect() as c:
        assert len(c.execute(outputs.select()).all()) == 1
    pipe.stop()


def test_localizer_and_screenshot_series_are_left_out_one_by_one(tmp_path: Path) -> None:
    import copy

    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    ctx, pipe = node(tmp_path, nlm_runner, mark_key=WatermarkKey.generate(key_id=4))
    series = make_series(3, rows=256, cols=256)
    scout = copy.deepcopy(series[0])  # a localizer inside the axial series
    scout.SOPInstanceUID = generate_uid()
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    screen = copy.deepcopy(series[1])  # a dose screen: its own series, Secondary Capture
    screen.SOPInstanceUID, screen.SeriesInstanceUID = generate_uid(), generate_uid()
    screen.SOPClassUID = SecondaryCaptureImageStorage
    for ds in (scout, screen):
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    study = send(ctx, [*series, scout, screen])
    assert pipe.complete_study(study)
    pipe.pool.drain()
    (job,) = pipe.jobs.list(kind="engine")  # the screenshot series is not routed at all
    assert job.state is JobState.SUCCEEDED, job.error
    assert job.result["left_out"] == [{"sop_uid": str(scout.SOPInstanceUID),
                                       "reason": "localizer / scout (Image Type LOCALIZER)"}]
    assert len(job.result["outputs"]) == 1
    left = {e.event.subject["sop_uid"]: e.event.payload for e in ctx.ledger.entries()
            if e.event.type.value == "instance.left_out"}
    assert set(left) == {str(scout.SOPInstanceUID), str(screen.SOPInstanceUID)}
    assert left[str(screen.SOPInstanceUID)]["reason"].startswith("secondary capture")
    assert left[str(scout.SOPInstanceUID)]["job_id"] == job.id
    pipe.stop()


def test_other_size_objects_are_left_out_and_the_largest_stack_processed(tmp_path: Path) -> None:
    from pydicom.uid import generate_uid

    ctx, pipe = node(tmp_path, nlm_runner, mark_key=WatermarkKey.generate(key_id=4))
    series = make_series(3, rows=256, cols=256)
    (small,) = make_series(1, rows=128, cols=128, study_uid=str(series[0].StudyInstanceUID),
                           for_uid=str(series[0].FrameOfReferenceUID))
    small.SeriesInstanceUID = series[0].SeriesInstanceUID  # a second recon in the series
    small.SOPInstanceUID = generate_uid()
    small.file_meta.MediaStorageSOPInstanceUID = small.SOPInstanceUID
    study = send(ctx, [*series, small])
    assert pipe.complete_study(study)
    pipe.pool.drain()
    (job,) = pipe.jobs.list(kind="engine")
    assert job.state is JobState.SUCCEEDED, job.error
    (left,) = job.result["left_out"]
    assert left["sop_uid"] == str(small.SOPInstanceUID)
    assert "different_sizes" in left["reason"]
    assert len(ctx.index.instances(series_instance_uid=job.result["outputs"][0])) == 3
    pipe.stop()


def test_phantom_series_is_held_by_a_hold_rule(tmp_path: Path) -> None:
    """The documented hold rule (neither tasks nor destinations, before the processing rules)
    keeps a QA / phantom / calibration series out of processing; the patient series of the
    same study is processed; `study show` names the hold."""
    hold = {"name": "qa-hold", "match": {"SeriesDescription": r".*\b(PHANTOM|QA|CALIBRATION)\b.*"}}
    settings = load_settings(None, environment="development",
                             data_dir=str(tmp_path / "node"), pipeline={
        "quiet_period_s": 3600,
        "destinations": [{"name": "pacs", "kind": "dimse", "ae_title": "PACS",
                          "host": "127.0.0.1", "port": get_port(),
                          "accepts_synthetic": True, "max_attempts": 1, "backoff_s": 0.1}],
        "rules": [hold,
                  {"name": "ct", "match": {"modality": "CT"},
                   "tasks": [{"task": "ct_denoise", "output_format": "sc"}],
                   "destinations": ["pacs"]}],
    })
    from node.pipeline.rules import check_rules

    assert check_rules(settings.pipeline) == []  # a hold rule is not a configuration mistake
    ctx = build_context(settings, fsync=False)
    pipe = Pipeline.from_context(ctx, runner=nlm_runner)
    patient = make_series(2, rows=64, cols=64)
    qa = make_series(2, rows=64, cols=64, study_uid=str(patient[0].StudyInstanceUID))
    for ds in qa:
        ds.SeriesDescription = "Daily QA water phantom"
    for ds in patient:
        ds.SeriesDescription = "Head 5mm"
    study = send(ctx, patient + qa)
    assert pipe.complete_study(study)
    pipe.pool.drain()
    engine = pipe.jobs.list(kind="engine")
    assert [j.series_uid for j in engine] == [str(patient[0].SeriesInstanceUID)]
    rep = pipe.study_report(study)
    by_uid = {s["series_uid"]: s for s in rep["series"]}
    held = by_uid[str(qa[0].SeriesInstanceUID)]
    assert held["rule"] == "qa-hold" and "held by rule 'qa-hold'" in held["held"]
    assert by_uid[str(patient[0].SeriesInstanceUID)]["held"] is None
    assert by_uid[str(patient[0].SeriesInstanceUID)]["rule"] == "ct"
    # each held object is named in the ledger with the rule
    left = [e.event for e in ctx.ledger.entries() if e.event.type.value == "instance.left_out"]
    assert {e.subject["sop_uid"] for e in left} == {str(ds.SOPInstanceUID) for ds in qa}
    assert all(e.payload["rule"] == "qa-hold" and e.payload["routing"] == "held by rule"
               for e in left)
    pipe.stop()


def test_2d_multislice_mr_with_non_contiguous_slices_is_processed_run_by_run(
        tmp_path: Path) -> None:
    """A 2D multi-slice MR series with a skipped slice is not one evenly spaced volume: the
    engine runs on each evenly spaced run on its own (its 2.5D context never spans the gap) and
    the output series has every received slice at its received position."""
    calls: list[int] = []

    def runner(task: str, volume: Volume, params: dict, seed: int,
               model: str | None) -> TaskResult:
        calls.append(volume.data.shape[0])
        return nlm_runner(task, volume, params, seed, model)

    settings = load_settings(None, environment="development",
                             data_dir=str(tmp_path / "node"), pipeline={
        "quiet_period_s": 3600,
        "rules": [{"name": "mr", "match": {"modality": "MR"},
                   "tasks": [{"task": "mr_denoise", "output_format": "sc"}]}],
    })
    ctx = build_context(settings, fsync=False)
    pipe = Pipeline.from_context(ctx, runner=runner, mark_key=WatermarkKey.generate(key_id=4))
    series = make_series(6, rows=256, cols=256, modality="MR", spacing=6.0, shuffle=False)
    for ds in series:
        ds.MRAcquisitionType = "2D"
    del series[2]
    study = send(ctx, series)
    assert pipe.complete_study(study)
    pipe.pool.drain()
    (job,) = pipe.jobs.list(kind="engine")
    assert job.state is JobState.SUCCEEDED, job.error
    assert sorted(calls) == [2, 3]
    assert job.result["outcome"] == "passed", job.result
    (out,) = job.result["outputs"]
    import pydicom

    positions = sorted(
        float(pydicom.dcmread(BytesIO(ctx.store.read(i.file_path)),
                          stop_before_pixels=True).ImagePositionPatient[2])
        for i in ctx.index.instances(series_instance_uid=out))
    assert positions == sorted(float(ds.ImagePositionPatient[2]) for ds in series)
    pipe.stop()
