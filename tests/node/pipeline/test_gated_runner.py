"""The production engine runner: model gate -> engine.load_model -> run_task (tiny model)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit.ledger import Ledger
from audit.modelgate import Approver, ModelGate, ModelRefused
from engine.api import Intensity, Volume
from node.db import make_engine, upgrade
from node.pipeline.jobs import PermanentJobError
from node.pipeline.runner import GatedEngineRunner
from tests.support.engine import tiny_model_dir



def _model_dir(root: Path, task: str = "ct_denoise") -> Path:
    return tiny_model_dir(root, task)


def test_gated_runner_runs_an_approved_model_and_refuses_a_changed_one(sqlite_url: str, tmp_path: Path) -> None:
    upgrade(sqlite_url)
    ledger = Ledger(make_engine(sqlite_url))
    key = Ed25519PrivateKey.generate()
    gate = ModelGate(ledger, [Approver("tester", key.public_key())])
    models = tmp_path / "models"
    d = _model_dir(models)
    runner = GatedEngineRunner(gate, models, device="cpu")
    rng = np.random.default_rng(0)
    vol = Volume(rng.normal(40, 20, (3, 16, 16)).astype(np.float32), (2.0, 0.7, 0.7), Intensity.HU)
    with pytest.raises(ModelRefused):  # not approved yet
        runner("ct_denoise", vol, {}, 1, None)
    gate.approve(d, key)
    result = runner("ct_denoise", vol, {}, 1, None)
    assert result.outputs[0].data.shape == vol.data.shape
    manifest = json.loads((d / "manifest.json").read_text())
    assert result.provenance.weights_sha256 == manifest["files"]["model.safetensors"]
    again = runner("ct_denoise", vol, {}, 1, None)
    np.testing.assert_array_equal(again.outputs[0].data, result.outputs[0].data)  # seeded
    with pytest.raises(PermanentJobError, match="no model for task"):
        runner("ct_to_mr", vol, {}, 1, None)
    with (d / "model.safetensors").open("ab") as f:
        f.write(b"\0")  # one byte changed after approval
    with pytest.raises(ModelRefused):
        runner("ct_denoise", vol, {}, 1, None)
    types = [e.event.type.value for e in ledger.entries()]
    assert types.count("model.loaded") == 2 and "model.refused" in types


def test_build_pipeline_from_settings(tmp_path: Path) -> None:
    from audit.watermark import WatermarkKey
    from config.settings import load_settings
    from node.app import build_context
    from node.pipeline.orchestrator import build_pipeline

    settings = load_settings(None, environment="development", data_dir=str(tmp_path / "n"))
    ctx = build_context(settings, fsync=False)
    p = build_pipeline(ctx)
    # first start: a marking key is generated (mode 0600, key id 1), as the ledger key is
    kf = settings.watermark_key_file
    assert kf.is_file() and (kf.stat().st_mode & 0o777) == 0o600
    assert p.mark_key is not None and p.mark_key.key_id == 1 and p.detect is not None
    assert p.on_instance_stored in ctx.on_instance_stored
    p.tracker.shutdown()
    # an existing key is used as it is, never overwritten
    kf.unlink()
    key = WatermarkKey.generate(key_id=5)
    key.to_file(kf)
    p2 = build_pipeline(build_context(settings, fsync=False))
    assert p2.mark_key is not None and p2.mark_key.key_id == 5
    assert WatermarkKey.from_file(kf).key_id == 5
    assert isinstance(p2.runner, GatedEngineRunner) and p2.runner.models_dir == settings.models_dir
    p2.tracker.shutdown()


def test_gated_runner_runs_an_adapter_on_its_base_only(sqlite_url: str, tmp_path: Path) -> None:
    """A ControlNet adapter runs with its base, both admitted by the gate; an adapter whose
    recorded base is not the base folder of that id (here: the base was swapped for another
    approved model of the same id) is refused, with a model.refused event."""
    from engine.api import TaskName
    from tests.support.engine import tiny_adapter_dir, tiny_base_dir

    upgrade(sqlite_url)
    ledger = Ledger(make_engine(sqlite_url))
    key = Ed25519PrivateKey.generate()
    gate = ModelGate(ledger, [Approver("tester", key.public_key())])
    models = tmp_path / "models"
    base = tiny_base_dir(models)
    adapter = tiny_adapter_dir(models, base, perturb=0.05)
    gate.approve(base, key)
    gate.approve(adapter, key)
    runner = GatedEngineRunner(gate, models, device="cpu")
    rng = np.random.default_rng(0)
    vol = Volume(rng.normal(40, 60, (3, 32, 32)).astype(np.float32), (2.0, 0.7, 0.7),
                 Intensity.HU)
    result = runner(TaskName.CT_SPARSE_VIEW, vol, {}, 1, None)
    assert result.provenance.model_id == "tiny-ct-sparse-view-adapter"
    base_manifest = json.loads((base / "manifest.json").read_text())
    assert (result.provenance.extra["base"]["weights_sha256"]
            == base_manifest["files"]["model.safetensors"])
    loaded = [e.event for e in ledger.entries() if e.event.type.value == "model.loaded"]
    assert [e.subject["model_id"] for e in loaded] == ["tiny-base", "tiny-ct-sparse-view-adapter"]
    # another base under the same id, approved: the adapter is refused on it
    import shutil

    shutil.rmtree(base)
    tiny_base_dir(models, seed=7)
    gate.approve(base, key)
    with pytest.raises(ModelRefused, match="adapter is for base tiny-base"):
        runner(TaskName.CT_SPARSE_VIEW, vol, {}, 1, None)
    assert ledger.entry(ledger.size() - 1).event.type.value == "model.refused"
