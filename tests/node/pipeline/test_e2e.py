"""End to end with real peers: DCMTK storescu sends a CT series to a running node (DIMSE
SCP), the quiet period completes the study, the engine (a tiny model admitted by the model
gate) synthesises T2w MR, the watermarked synthetic series and the original series arrive
in a real Orthanc; dciodvfy passes; the ledger holds the lineage; re-sending the synthetic
series to the node triggers nothing.

The model is untrained (tiny, seeded): this tests the plumbing, not image quality, so the
quality gate is switched off here (its own tests are in test_quality.py / test_pipeline.py).
(An untrained CT restoration model adds ~60 HU of noise, in which a 2 HU mark is, correctly,
not detectable, so dispatch refuses it; MR outputs get a noise-relative mark strength.)
"""
from __future__ import annotations

import subprocess
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit.ledger import Ledger
from audit.modelgate import public_key_b64
from audit.watermark import WatermarkKey, detect
from config.settings import load_settings
from node.app import create_node
from node.pipeline.jobs import JobKind, JobState
from tests.support.net import get_port, require_tool, wait_for
from tests.support.dimse import dcmtk, node_settings_dict
from tests.support.orthanc import OrthancServer
from tests.support.dicomcheck import dciodvfy_errors
from tests.support.factory import make_series
from tests.support.engine import approved_tiny_model

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk, pytest.mark.slow]



def test_storescu_to_node_to_orthanc(tmp_path: Path, orthanc: OrthancServer) -> None:
    tool = require_tool("dciodvfy")
    storescu = dcmtk("storescu")
    approver = Ed25519PrivateKey.generate()
    models = tmp_path / "models"
    data = tmp_path / "node"
    port = get_port()
    settings = load_settings(None, **node_settings_dict(
        data, port,
        audit={"approvers": [{"name": "tester", "public_key": public_key_b64(approver.public_key())}],
               "models_dir": str(models)},
        engine={"device": "cpu"},
        # the untrained model's smooth output: a bound that carries a readable mark whatever
        # the (random) watermark key, so the output is verified and dispatched
        watermark={"other_max_delta": 16},
        pipeline={
            "enabled": True,
            "quiet_period_s": 2,
            "quality": {"enabled": False},
            "destinations": [{"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet,
                              "host": "127.0.0.1", "port": orthanc.dicom_port,
                              "accepts_synthetic": True, "backoff_s": 1}],
            "rules": [{"name": "ct-to-mr", "match": {"modality": "CT", "calling_ae": "STORESCU"},
                       "tasks": [{"task": "ct_to_mr", "params": {"target": "t2w"},
                                  "output_format": "mf_word_sc"}],
                       "destinations": ["pacs"], "forward_originals": True}],
        }))
    wm_key = WatermarkKey.generate(key_id=9)
    settings.watermark_key_file.parent.mkdir(parents=True, exist_ok=True)
    wm_key.to_file(settings.watermark_key_file)
    node = create_node(settings)
    approved_tiny_model(models, Ledger(node.ctx.engine), approver)
    node.start()
    try:
        series = make_series(4, rows=256, cols=256)
        files = []
        for i, ds in enumerate(series):
            p = tmp_path / f"ct{i}.dcm"
            ds.save_as(p, enforce_file_format=True)
            files.append(str(p))
        subprocess.run([storescu, "-aet", "STORESCU", "-aec", "SYNTHNODE", "127.0.0.1", str(port),
                        *files], check=True, timeout=60, capture_output=True)
        study = str(series[0].StudyInstanceUID)
        originals = {str(ds.SOPInstanceUID) for ds in series}
        # quiet period -> engine job -> output -> dispatch (outputs + originals)
        def delivered():  # type: ignore[no-untyped-def]
            failed = [j for j in node.pipeline.jobs.list(study_uid=study) if j.state is JobState.FAILED]
            assert not failed, [(j.kind, j.error) for j in failed]
            uids = orthanc.instance_uids()
            return uids if len(uids) >= 5 else None

        got = wait_for(delivered, 240, "outputs and originals in Orthanc")
        assert originals <= got
        (out_uid,) = got - originals
        out = pydicom.dcmread(BytesIO(orthanc.instance_file(out_uid)))
        assert out.SyntheticData == "YES" and out.Modality == "MR"
        assert out.StudyInstanceUID == study and out.NumberOfFrames == 4
        assert out.ContributingEquipmentSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109100"
        assert detect(out.pixel_array, [wm_key]).marked
        p = tmp_path / "out.dcm"
        out.save_as(p, enforce_file_format=True)
        assert dciodvfy_errors(p, tool) == []
        pipe = node.pipeline
        eng = [j for j in pipe.jobs.list(study_uid=study) if j.kind is JobKind.ENGINE]
        assert len(eng) == 1 and eng[0].state is JobState.SUCCEEDED
        types = [e.event.type.value for e in node.ctx.ledger.entries()]
        for t in ("model.approved", "instance.received", "study.completed", "model.loaded",
                  "job.started", "output.created", "job.finished", "dispatch.succeeded"):
            assert t in types, t
        # re-sending the synthetic series to the node does not trigger processing
        subprocess.run([storescu, "-aet", "STORESCU", "-aec", "SYNTHNODE", "127.0.0.1", str(port),
                        str(p)], check=True, timeout=60, capture_output=True)
        time.sleep(4)  # longer than the quiet period
        assert len([j for j in pipe.jobs.list(study_uid=study) if j.kind is JobKind.ENGINE]) == 1
        assert pipe.tracker.status(study).state == "complete"
    finally:
        node.stop(grace_s=5)
