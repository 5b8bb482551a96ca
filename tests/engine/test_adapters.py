"""ControlNet adapters (engine.adapters): a frozen base + ControlNet, the base recorded and
checked, the reconstruction tasks run through the ordinary task runner."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.adapters import ControlledUNet, load_adapter, load_adapter_dir
from engine.api import Intensity, TaskName, Volume, run_task
from engine.models import ModelLoadError, load_model_dir, sha256_hex
from engine.tasks import TaskInputError
from tests.support.engine import tiny_adapter_dir, tiny_base_dir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_base_dir(root, manifest=False)
    return {
        "base": base,
        "other_base": tiny_base_dir(root, name="other-base", seed=5, manifest=False),
        "zero": tiny_adapter_dir(root, base, name="zero-init", manifest=False),
        "ct": tiny_adapter_dir(root, base, perturb=0.05, manifest=False),
        "mr": tiny_adapter_dir(root, base, TaskName.MR_UNDERSAMPLED, perturb=0.05,
                               manifest=False),
    }


def _ct(shape: tuple[int, int, int] = (3, 32, 32)) -> Volume:
    rng = np.random.default_rng(0)
    return Volume(rng.normal(40, 60, shape).astype(np.float32), (2.0, 0.7, 0.7), Intensity.HU)


def test_zero_initialised_adapter_is_exactly_the_base(dirs: dict[str, Path]) -> None:
    """MONAI ControlNet starts with zero convolutions: before training the controlled network
    is the frozen base with its condition slots zeroed, whatever the condition."""
    base = load_model_dir(dirs["base"])
    model = load_adapter_dir(dirs["zero"], dirs["base"])
    assert isinstance(model.net, ControlledUNet)
    x = torch.randn(2, 4, 16, 16)
    cond = torch.randn(2, 12, 16, 16)
    t = torch.tensor([100, 250])
    with torch.no_grad():
        got = model.net(torch.cat([x, cond], 1), t)
        want = base.net(torch.cat([x, torch.zeros_like(cond)], 1), t)
    assert want.abs().max() > 1e-3  # the base's output is not trivially zero
    torch.testing.assert_close(got, want)
    # a trained (here: perturbed) adapter does use the condition
    ct = load_adapter_dir(dirs["ct"], dirs["base"])
    with torch.no_grad():
        a = ct.net(torch.cat([x, cond], 1), t)
        b = ct.net(torch.cat([x, 2 * cond], 1), t)
    assert (a - b).abs().max() > 1e-4


def test_adapter_refuses_another_base_and_changed_bytes(dirs: dict[str, Path]) -> None:
    cfg = json.loads((dirs["ct"] / "config.json").read_text())
    w = (dirs["ct"] / "model.safetensors").read_bytes()
    other = load_model_dir(dirs["other_base"])
    with pytest.raises(ModelLoadError, match="was trained on base tiny-base"):
        load_adapter(cfg, w, sha256_hex(w), other)
    base = load_model_dir(dirs["base"])
    with pytest.raises(ModelLoadError, match="does not match"):
        load_adapter(cfg, w + b"\0", sha256_hex(w), base)
    with pytest.raises(ModelLoadError, match=r"lacks \['base'\]"):
        load_adapter({k: v for k, v in cfg.items() if k != "base"}, w, sha256_hex(w), base)
    # the base's weights alone are no adapter
    bw = (dirs["base"] / "model.safetensors").read_bytes()
    with pytest.raises(ModelLoadError):
        load_adapter(cfg, bw, sha256_hex(bw), base)


def test_reconstruction_tasks_run_through_the_task_runner(dirs: dict[str, Path]) -> None:
    ct = load_adapter_dir(dirs["ct"], dirs["base"])
    vol = _ct()
    r = run_task(TaskName.CT_SPARSE_VIEW, vol, model=ct, params=None, seed=3, device="cpu")
    out = r.outputs[0]
    assert out.data.shape == vol.data.shape and out.intensity == Intensity.HU
    assert np.isfinite(out.data).all()
    p = r.provenance
    assert p.task == "ct_sparse_view" and p.model_id == "tiny-ct-sparse-view-adapter"
    assert p.weights_sha256 == sha256_hex((dirs["ct"] / "model.safetensors").read_bytes())
    base_sha = sha256_hex((dirs["base"] / "model.safetensors").read_bytes())
    assert p.extra["base"]["weights_sha256"] == base_sha
    assert p.parameters["steps"] == 1 and p.parameters["strength"] == pytest.approx(0.3)
    again = run_task(TaskName.CT_SPARSE_VIEW, vol, model=ct, params=None, seed=3, device="cpu")
    np.testing.assert_array_equal(again.outputs[0].data, out.data)
    # the base's noise levels bound the start: strength above its train_t_max is refused
    with pytest.raises(TaskInputError, match="train_t_max"):
        run_task(TaskName.CT_SPARSE_VIEW, vol, model=ct, params={"strength": 0.9}, seed=3)
    # an adapter serves its own task only, on its own kind of input
    with pytest.raises(TaskInputError, match="not made for task"):
        run_task(TaskName.MR_UNDERSAMPLED, vol, model=ct, params=None, seed=3)
    mr = load_adapter_dir(dirs["mr"], dirs["base"])
    mr_vol = Volume(np.abs(vol.data) + 1, vol.spacing, Intensity.MR_T2W)
    with pytest.raises(TaskInputError, match="needs intensity in"):
        run_task(TaskName.MR_UNDERSAMPLED, vol, model=mr, params=None, seed=3)
    r = run_task(TaskName.MR_UNDERSAMPLED, mr_vol, model=mr, params=None, seed=3)
    assert r.outputs[0].intensity == Intensity.MR_T2W and np.isfinite(r.outputs[0].data).all()
