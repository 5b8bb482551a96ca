"""End to end with the shipped models and the quality gate on (issue 6 "End-to-end tests").

DCMTK storescu sends a clinical-size CT series (512x512 slices of an engine.research.phantoms abdomen
with simulated low dose, CT Image Storage, HU through Rescale Intercept -1024) to a running
node. The node has the BUNDLED models of engine/weights (ct-denoise-wreg, ct-to-mr-wreg)
approved through the model gate, the quality gate enabled with its default limits, and one
rule with two tasks: CT restoration (single-frame SC) and CT -> T2w MR synthesis (Legacy
Converted Enhanced MR). Both synthetic series must arrive in a real Orthanc with the
synthetic tagging, pass dciodvfy, carry a detectable watermark whose payload is the ledger's
``output.created`` payload, the ledger lineage must be complete and ``audit verify`` clean.

Image quality is checked against the phantom's ground truth (not only plumbing): the
restored CT is closer to the noise-free phantom than the low-dose input (MAE in HU inside
the body), and the synthetic T2w is closer to the phantom's noise-free T2w than the best
constant image, with the fat-brighter-than-muscle contrast of T2w.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydicom.dataset import Dataset
from typer.testing import CliRunner

from audit.ledger import Ledger
from audit.modelgate import Approver, ModelGate, public_key_b64
from audit.watermark import WatermarkKey, detect
from config.settings import load_settings
from engine.research.degrade import low_dose_ct
from engine.research.phantoms import Tissue, make_sample
from node.app import create_node
from node.cli import app
from node.pipeline.jobs import JobKind, JobState
from tests.support.net import get_port, require_tool, wait_for
from tests.support.dimse import dcmtk, node_settings_dict
from tests.support.orthanc import OrthancServer
from tests.support.dicomcheck import dciodvfy_errors
from tests.support.factory import make_series

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk, pytest.mark.slow]

WEIGHTS = Path(__file__).resolve().parents[3] / "engine" / "weights"
MODELS = ("ct-denoise-wreg", "ct-to-mr-wreg")  # the shipped defaults for the two tasks
N_SLICES = 8
SIZE = 512  # clinical CT matrix
DOSE = 0.25  # fraction of full dose (projection-domain Poisson noise)


def _approve_bundled(models: Path, ledger: Ledger, key: Ed25519PrivateKey) -> dict[str, str]:
    """Copy the shipped model folders (as shipped: manifest included) and approve them with a
    test approver key; returns model id -> weights SHA-256 from the manifests."""
    gate = ModelGate(ledger, [Approver("tester", key.public_key())])
    digests = {}
    for name in MODELS:
        d = models / name
        shutil.copytree(WEIGHTS / name, d)
        gate.approve(d, key)
        manifest = json.loads((d / "manifest.json").read_text())
        digests[manifest["model_id"]] = manifest["files"]["model.safetensors"]
    return digests


def _physical(ds: Dataset) -> np.ndarray:
    """Frames (z, y, x) in physical values: Modality LUT from the top level (single-frame,
    MF SC) or the shared functional groups (enhanced)."""
    arr = ds.pixel_array.astype(np.float64)
    arr = arr[None] if arr.ndim == 2 else arr
    src: Dataset = ds
    if "RescaleSlope" not in ds and "SharedFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0]
        if "PixelValueTransformationSequence" in shared:
            src = shared.PixelValueTransformationSequence[0]
    return arr * float(src.get("RescaleSlope", 1)) + float(src.get("RescaleIntercept", 0))


def _frame_z(ds: Dataset) -> list[float]:
    if "PerFrameFunctionalGroupsSequence" in ds:
        return [float(f.PlanePositionSequence[0].ImagePositionPatient[2])
                for f in ds.PerFrameFunctionalGroupsSequence]
    return [float(ds.ImagePositionPatient[2])]


def _volume(datasets: list[Dataset]) -> np.ndarray:
    """Stack of physical values sorted by z (the input series is axial, normal +z)."""
    frames = [(z, img) for ds in datasets for z, img in zip(_frame_z(ds), _physical(ds))]
    frames.sort(key=lambda f: f[0])
    return np.stack([img for _, img in frames])


def test_shipped_models_storescu_to_orthanc(tmp_path: Path, orthanc: OrthancServer) -> None:
    tool = require_tool("dciodvfy")
    storescu = dcmtk("storescu")

    # -- the study: abdomen phantom, 512x512, simulated low dose --------------------------
    sample = make_sample(seed=4242, size=SIZE, n_slices=N_SLICES, kind="abdomen",
                         mr_snr=None, bias_strength=0.0)
    low = low_dose_ct(sample.ct_hu, sample.spacing[1], DOSE, seed=11)
    series = make_series(hu=low, spacing=sample.spacing[0],
                         pixel_spacing=sample.spacing[1:], body_part="ABDOMEN", seed=3)
    stored_low = np.clip(np.rint(low + 1024), 0, 65535) - 1024  # what the node receives
    body = sample.labels != Tissue.AIR
    study = str(series[0].StudyInstanceUID)
    src_series = str(series[0].SeriesInstanceUID)
    for_uid = str(series[0].FrameOfReferenceUID)
    originals = {str(ds.SOPInstanceUID) for ds in series}

    # -- the node: bundled models approved, quality gate on (defaults) --------------------
    approver = Ed25519PrivateKey.generate()
    models = tmp_path / "models"
    data = tmp_path / "node"
    port = get_port()
    cfg = node_settings_dict(
        data, port,
        audit={"approvers": [{"name": "tester", "public_key": public_key_b64(approver.public_key())}],
               "models_dir": str(models)},
        engine={"device": "cpu"},
        pipeline={
            "enabled": True,
            "quiet_period_s": 2,
            "destinations": [{"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet,
                              "host": "127.0.0.1", "port": orthanc.dicom_port,
                              "accepts_synthetic": True, "backoff_s": 1}],
            "rules": [{"name": "abdomen-ct", "match": {"modality": "CT", "calling_ae": "STORESCU"},
                       "tasks": [{"task": "ct_denoise", "output_format": "sc"},
                                 {"task": "ct_to_mr", "params": {"target": "t2w"},
                                  "output_format": "enhanced"}],
                       "destinations": ["pacs"]}],
        })
    cfg_file = tmp_path / "synthnode.toml"
    cfg_file.write_bytes(tomli_w.dumps(cfg).encode())
    settings = load_settings(cfg_file)
    assert settings.pipeline.quality.enabled  # the default, not switched off here
    wm_key = WatermarkKey.generate(key_id=5)
    settings.watermark_key_file.parent.mkdir(parents=True, exist_ok=True)
    wm_key.to_file(settings.watermark_key_file)
    node = create_node(settings)
    digests = _approve_bundled(models, Ledger(node.ctx.engine), approver)
    node.start()
    try:
        files = []
        for i, ds in enumerate(series):
            p = tmp_path / f"ct{i}.dcm"
            ds.save_as(p, enforce_file_format=True)
            files.append(str(p))
        subprocess.run([storescu, "-aet", "STORESCU", "-aec", "SYNTHNODE", "127.0.0.1", str(port),
                        *files], check=True, timeout=120, capture_output=True)
        pipe = node.pipeline

        def delivered():  # type: ignore[no-untyped-def]
            js = pipe.jobs.list(study_uid=study)
            bad = [(j.kind, j.task, j.error, j.result) for j in js
                   if j.state in (JobState.FAILED, JobState.CANCELLED)]
            assert not bad, bad
            held = [j.result for j in js if j.kind is JobKind.ENGINE and j.result and j.result.get("held")]
            assert not held, f"quality gate held a shipped model's output: {held}"
            disp = [j for j in js if j.kind is JobKind.DISPATCH]
            return len(disp) == 2 and all(j.state is JobState.SUCCEEDED for j in disp)

        wait_for(delivered, 420, "both synthetic series delivered to Orthanc", every=1.0)
        engine_jobs = {j.task: j for j in pipe.jobs.list(study_uid=study) if j.kind is JobKind.ENGINE}
        assert set(engine_jobs) == {"ct_denoise", "ct_to_mr"}
        assert all(j.state is JobState.SUCCEEDED for j in engine_jobs.values())
    finally:
        node.stop(grace_s=10)

    # -- what Orthanc holds: two new series in the same study ----------------------------
    got = orthanc.instance_uids()
    assert not (got & originals)  # originals are not forwarded by this rule
    outs = [pydicom.dcmread(BytesIO(orthanc.instance_file(u))) for u in sorted(got)]
    by_series: dict[str, list[Dataset]] = {}
    for ds in outs:
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    assert len(by_series) == 2 and src_series not in by_series
    ct_out = [s for s in by_series.values() if s[0].Modality == "CT"]
    mr_out = [s for s in by_series.values() if s[0].Modality == "MR"]
    assert len(ct_out) == 1 and len(mr_out) == 1
    ct_series, (mr,) = ct_out[0], mr_out[0]
    assert len(ct_series) == N_SLICES  # single-frame SC: one instance per slice
    assert int(mr.NumberOfFrames) == N_SLICES  # enhanced: one multi-frame instance
    model_of = {"CT": "ct-denoise-wreg", "MR": "ct-to-mr-wreg"}

    ledger_outputs = {}
    for e in node.ctx.ledger.entries():
        if e.event.type.value == "output.created":
            ledger_outputs[e.event.payload["output_series_uid"]] = e.event.payload
    assert set(ledger_outputs) == set(by_series)

    scores: list[str] = []
    for series_uid, dss in by_series.items():
        sop_uids = set()
        for ds in dss:
            assert ds.SyntheticData == "YES"
            # DERIVED\SECONDARY; enhanced objects enumerate value 2 as PRIMARY only
            # (PS3.3 C.8.16.1), there Synthetic Data carries the derivation (node/dicom/codes.py)
            enhanced = "SharedFunctionalGroupsSequence" in ds
            assert list(ds.ImageType)[:2] == ["DERIVED", "PRIMARY" if enhanced else "SECONDARY"]
            assert str(ds.SeriesDescription).startswith("SYNTHETIC")
            assert ds.StudyInstanceUID == study
            assert ds.SOPInstanceUID not in originals
            assert ds.FrameOfReferenceUID == for_uid
            (equip,) = ds.ContributingEquipmentSequence
            assert equip.PurposeOfReferenceCodeSequence[0].CodeValue == "109100"
            assert equip.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "DCM"
            model_id = model_of[ds.Modality]
            assert equip.ManufacturerModelName == model_id
            assert digests[model_id] in list(equip.SoftwareVersions)
            assert f"sha256:{digests[model_id]}" in str(ds.DerivationDescription)
            refs = {str(i.ReferencedSOPInstanceUID) for i in ds.SourceImageSequence}
            assert refs and refs <= originals
            assert all(i.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
                       for i in ds.SourceImageSequence)
            sop_uids.add(str(ds.SOPInstanceUID))
        if len(dss) > 1:  # every source slice referenced once across the SC series
            assert {str(i.ReferencedSOPInstanceUID) for ds in dss
                    for i in ds.SourceImageSequence} == originals
        else:
            assert {str(i.ReferencedSOPInstanceUID) for i in dss[0].SourceImageSequence} == originals
        payload = ledger_outputs[series_uid]
        assert set(payload["output_sop_uids"]) == sop_uids
        assert payload["weights_sha256"] == digests[payload["model_id"]]
        for ds in dss:
            # every output as Orthanc returns it passes dciodvfy ...
            p = tmp_path / f"check-{ds.SOPInstanceUID}.dcm"
            ds.save_as(p, enforce_file_format=True)
            assert dciodvfy_errors(p, tool) == [], ds.SOPClassUID
            # ... and carries the mark, whose payload is the ledger's output.created payload
            det = detect(ds.pixel_array, [wm_key])
            assert det.marked, (ds.Modality, det)
            assert det.payload_hex == payload["watermark_payload"], (det, payload["watermark_payload"])
            scores.append(f"{ds.Modality} {det.score:.1f}/{det.threshold:.1f}")

    # -- the quality gate's per-slice statistics are in the ledger; MR output non-negative --
    for series_uid, dss in by_series.items():
        q = ledger_outputs[series_uid]["quality"]
        if dss[0].Modality == "MR":
            assert float(q["min"]) >= 0.0, q  # engine contract: magnitude, clamped
            assert float(q["slice_foreground_dice_min"]) >= 0.5, q
        else:
            assert float(q["slice_edge_ratio_min"]) >= 0.85 and float(q["slice_correlation_min"]) >= 0.7, q

    # -- image quality against the phantom's ground truth --------------------------------
    restored = _volume(ct_series)
    assert restored.shape == sample.ct_hu.shape
    mae_in = float(np.abs(stored_low - sample.ct_hu)[body].mean())
    mae_out = float(np.abs(restored - sample.ct_hu)[body].mean())
    assert mae_out < mae_in, (mae_out, mae_in)
    t2w = _volume([mr])
    ref = sample.t2w
    mae_mr = float(np.abs(t2w - ref)[body].mean())
    mae_const = float(np.abs(np.median(ref[body]) - ref)[body].mean())
    assert mae_mr < mae_const, (mae_mr, mae_const)
    fat, muscle = sample.labels == Tissue.FAT, sample.labels == Tissue.MUSCLE
    assert t2w[fat].mean() > t2w[muscle].mean()  # T2w: fat bright, muscle dark
    print(f"restored CT MAE {mae_out:.2f} HU vs low-dose {mae_in:.2f} HU (body); synthetic T2w MAE "
          f"{mae_mr:.1f} vs constant {mae_const:.1f}; watermark score/threshold: {', '.join(scores)}; "
          f"quality: {[ledger_outputs[u]['quality'] for u in by_series]}")

    # -- ledger: lineage complete, verify clean -------------------------------------------
    runner = CliRunner()
    r = runner.invoke(app, ["audit", "lineage", study, "--json", "-c", str(cfg_file)])
    assert r.exit_code == 0, r.output
    tree = json.loads(r.output)
    (src,) = [s for s in tree["sources"] if s["series_uid"] == src_series]
    assert {i["sop_uid"] for i in src["instances"]} == originals
    # source -> engine job (task, the model that ran) -> output -> dispatches; the dispatch
    # jobs are not jobs of the tree, their ids ride on the dispatches
    assert [s["series_uid"] for s in tree["sources"]] == [src_series]  # outputs are not sources
    assert len(tree["jobs"]) == 2 and tree["unattached_dispatches"] == []
    for j in tree["jobs"]:
        assert j["source_series_uids"] == [src_series]
        assert j["model_id"] == model_of["CT" if j["task"] == "ct_denoise" else "MR"]
        assert j["weights_sha256"] == digests[j["model_id"]] and j["model_version"]
        types = [e["type"] for e in j["events"]]
        assert "job.started" in types and "job.finished" in types
        (o,) = j["outputs"]
        assert o["series_uid"] in by_series
        assert o["watermark_payload"] == ledger_outputs[o["series_uid"]]["watermark_payload"]
        (dj,) = o["dispatch_jobs"]
        assert dj["destination"] == "pacs" and dj["state"] == "succeeded"
        assert any(d["type"] == "dispatch.succeeded" and d["destination"] == "pacs"
                   and d["series_uid"] == o["series_uid"] and d["job_id"] == dj["job_id"]
                   for d in o["dispatches"]), o
    r = runner.invoke(app, ["audit", "lineage", study, "-c", str(cfg_file)])
    assert r.exit_code == 0, r.output
    assert "model not recorded" not in r.output
    for j in tree["jobs"]:
        assert f"engine job {j['job_id']}" in r.output and f"model {j['model_id']}" in r.output
    r = runner.invoke(app, ["audit", "verify", "-c", str(cfg_file)])
    assert r.exit_code == 0, r.output
    assert "OK" in r.output
