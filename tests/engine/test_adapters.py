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


WEIGHTS = Path(__file__).resolve().parents[2] / "engine" / "weights"
SHIPPED_ADAPTERS = sorted(p.name for p in (WEIGHTS / "adapters").glob("*")
                          if (p / "config.json").exists())


def test_an_adapter_is_shipped() -> None:
    assert "ct-sparse-view-cnet" in SHIPPED_ADAPTERS


@pytest.mark.parametrize("name", SHIPPED_ADAPTERS)
def test_shipped_adapter_folder_base_and_card(name: str) -> None:
    """Card digest = weights digest; config and manifest record the shipped base's weights
    digest; the adapter loads on that base."""
    d = WEIGHTS / "adapters" / name
    cfg = json.loads((d / "config.json").read_text())
    manifest = json.loads((d / "manifest.json").read_text())
    assert cfg["model_id"] == name == manifest["model_id"]
    assert manifest["base"] == cfg["base"]
    base_dir = WEIGHTS / cfg["base"]["model_id"]
    assert cfg["base"]["weights_sha256"] == sha256_hex(
        (base_dir / "model.safetensors").read_bytes())
    w = (d / "model.safetensors").read_bytes()
    assert len(w) < 5e6
    assert sha256_hex(w) in (d / "MODEL_CARD.md").read_text()
    assert sha256_hex(w) == manifest["files"]["model.safetensors"]
    model = load_adapter_dir(d, base_dir)
    assert model.tasks == cfg["tasks"]


def test_shipped_sparse_view_adapter_removes_streaks() -> None:
    """On a validation head phantom with FBP from 60 views (256 px), the undertrained adapter
    lifts SSIM over its FBP input (measured: test split 0.785 -> 0.932, see its card) and stays
    within 2 dB of the input's PSNR; it is experimental and below TV."""
    from engine.research.adapters import cases
    from engine.research.evaluate import score

    d = WEIGHTS / "adapters" / "ct-sparse-view-cnet"
    cfg = json.loads((d / "config.json").read_text())
    model = load_adapter_dir(d, WEIGHTS / cfg["base"]["model_id"])
    case = cases(TaskName.CT_SPARSE_VIEW, "val", 1, 256)[0]  # index 0: abdomen, 60 views
    out = run_task(TaskName.CT_SPARSE_VIEW, case.input, model=model, params=None, seed=0,
                   device="cpu").outputs[0]
    before, after = score(case, case.input), score(case, out)
    assert after["ssim"] >= before["ssim"] + 0.05, (before["ssim"], after["ssim"])
    assert after["psnr"] >= before["psnr"] - 2.0, (before["psnr"], after["psnr"])


def test_evaluation_loads_an_adapter_folder_on_the_base_beside_it(tmp_path: Path) -> None:
    """``load_model_or_adapter_dir`` (what ``synthnode engine evaluate --model`` uses): a
    plain model folder loads as itself; an adapter folder loads on the base found beside it
    by its recorded model id; an adapter copied away from its base is refused by name."""
    import shutil

    from engine.adapters import load_model_or_adapter_dir
    from engine.models import ModelLoadError

    plain = load_model_or_adapter_dir(WEIGHTS / "ct-denoise-wreg")
    assert plain.model_id == "ct-denoise-wreg"
    d = WEIGHTS / "adapters" / "ct-sparse-view-cnet"
    adapter = load_model_or_adapter_dir(d)
    assert adapter.model_id == "ct-sparse-view-cnet" and adapter.tasks == ["ct_sparse_view"]
    lone = tmp_path / "x" / "ct-sparse-view-cnet"
    shutil.copytree(d, lone)
    with pytest.raises(ModelLoadError, match="ct-augment-wdiff"):
        load_model_or_adapter_dir(lone)


def test_ct_denoise_adapter_recipe_pairs_low_dose_with_normal_dose() -> None:
    """The ct_denoise adapter data (engine.research.adapters): normal-dose phantom CT paired
    with its projection-domain low dose at 0.25 and 0.1 of full dose, alternating; on the same
    phantom the lower dose is the noisier one, and both keep the reference's mean (noise, not
    bias)."""
    from engine.research.adapters import ADAPTER_TASKS, cases, degrade_sample
    from engine.research.phantoms import iter_dataset

    assert TaskName.CT_DENOISE in ADAPTER_TASKS
    pair = cases(TaskName.CT_DENOISE, "val", 2, 128)
    assert [c.info["degradation"] for c in pair] == ["dose 0.25", "dose 0.1"]
    assert all(c.input.intensity == Intensity.HU for c in pair)
    s = next(iter(iter_dataset("val", 1, size=128, n_slices=3, kind="mixed")))  # type: ignore[arg-type]
    err = []
    for i in (0, 1):  # dose 0.25, then 0.1, on the same phantom
        clean, low, inten, _ = degrade_sample(TaskName.CT_DENOISE, s, i)
        assert inten == Intensity.HU and low.shape == clean.shape
        d = (low - clean)[clean > -500]
        assert abs(float(d.mean())) < 5.0
        err.append(float(d.std()))
    assert 0 < err[0] < err[1]
