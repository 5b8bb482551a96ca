"""Smoke training (a few steps into tmp_path): model folder, card digest, metrics log, resume."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from engine.api import Intensity, Volume, run_task
from engine.models import load_model_dir
from engine.train import TrainConfig, make_batch, train

TINY_ARCH = {"channels": [8, 8], "num_res_blocks": 1, "attention_levels": [False, False],
             "norm_num_groups": 4, "wavelet": {"kind": "haar", "levels": 1}}


def toy_data(n: int = 4, size: int = 32, seed: int = 0) -> dict:
    """Arrays shaped like engine.train.prepare_data output (disc phantoms, Gaussian 'low dose')."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    ct = np.full((n, 3, size, size), -1000.0, np.float32)
    for i in range(n):
        r = size * rng.uniform(0.25, 0.45)
        ct[i][:, (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r] = 40.0
    ld = ct + rng.normal(0, 40, ct.shape).astype(np.float32)
    t1w = np.where(ct > -500, 600.0, 0.0).astype(np.float32)
    return {"ct": ct, "ld": ld, "nd": ct + rng.normal(0, 10, ct.shape).astype(np.float32), "t1w": t1w,
            "t2w": 0.5 * t1w, "dose": np.full(n, 0.25, np.float32), "seeds": np.arange(n),
            "kinds": np.zeros(n, np.int8), "meta": {"toy": True}}


@pytest.mark.parametrize("task", ["ct_denoise", "mr_denoise", "ct_to_mr"])
def test_batches_have_the_right_shapes(task: str) -> None:
    import torch

    tgt, cond = make_batch(task, toy_data(), torch.Generator().manual_seed(0), 3, 16)
    assert cond.shape == (3, 3, 16, 16)
    assert tgt.shape == (3, 2 if task == "ct_to_mr" else 1, 16, 16)
    assert torch.isfinite(tgt).all() and torch.isfinite(cond).all()


def test_smoke_train_writes_a_loadable_model_folder(tmp_path: Path) -> None:
    tc = TrainConfig(task="ct_denoise", steps=4, batch=2, crop=16, architecture=dict(TINY_ARCH), log_every=1,
                    ckpt_every=2, model_id="smoke-ct")
    d = train(tc, tmp_path, toy_data(), data_description="toy discs")
    assert sorted(p.name for p in d.iterdir()) == ["MODEL_CARD.md", "config.json", "model.safetensors"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_id"] == "smoke-ct" and cfg["tasks"] == ["ct_denoise"]
    assert cfg["io"]["residual_scale"] == 50.0
    assert cfg["training"]["seed"] == 0 and cfg["training"]["steps"] == 4
    digest = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    card = (d / "MODEL_CARD.md").read_text()
    assert f"weights SHA-256: `{digest}`" in card and "toy discs" in card
    lines = [json.loads(x) for x in (tmp_path / ".runs/smoke-ct/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in lines)
    m = load_model_dir(d)
    assert m.weights_sha256 == digest
    vol = Volume(toy_data()["ld"][0], (2.0, 1.0, 1.0), Intensity.HU)
    out = run_task("ct_denoise", vol, model=m, params={}, seed=0, device="cpu")
    assert out.outputs[0].data.shape == vol.data.shape


def test_interrupted_run_resumes_bit_identically(tmp_path: Path) -> None:
    data = toy_data()
    kw = dict(task="ct_to_mr", batch=2, crop=16, architecture=dict(TINY_ARCH), ckpt_every=2, log_every=1,
              model_id="m", steps=4)
    full = train(TrainConfig(**kw), tmp_path / "a", data)

    class Stop(Exception):
        pass

    def stop_after_2(i: int, n: int, rec: dict) -> None:
        if i == 2:
            raise Stop

    with pytest.raises(Stop):
        train(TrainConfig(**kw), tmp_path / "b", data, progress=stop_after_2)
    assert json.loads((tmp_path / "b/.runs/m/checkpoint.json").read_text())["step"] == 2
    resumed = train(TrainConfig(**kw), tmp_path / "b", data, resume=True)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for k in a:
        assert np.array_equal(a[k].numpy(), b[k].numpy()), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "b/.runs/m/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_regression_objective_trains_the_same_unet(tmp_path: Path) -> None:
    kw = dict(task="ct_denoise", steps=2, batch=2, crop=16, architecture=dict(TINY_ARCH))
    d = train(TrainConfig(objective="regression", **kw), tmp_path, toy_data())
    e = train(TrainConfig(objective="diffusion", **kw), tmp_path, toy_data())
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["objective"] == "regression" and cfg["tasks"] == ["ct_denoise"]
    assert load_file(str(d / "model.safetensors")).keys() == load_file(str(e / "model.safetensors")).keys()


def test_cli_train_smoke(tmp_path: Path) -> None:
    from node.cli import app

    data = toy_data(n=2, size=32)
    np.savez(tmp_path / "toy.npz", **{k: v for k, v in data.items() if k != "meta"},
             meta=np.array(json.dumps({"toy": True})))
    cfgfile = tmp_path / "c.toml"
    cfgfile.write_text(f'environment = "development"\ndata_dir = "{tmp_path}"\n[engine]\nthreads = 1\n')
    res = CliRunner().invoke(app, ["engine", "train", "ct_denoise", "--steps", "2", "--batch", "1", "--crop", "16",
                                   "--n-train", "2", "--size", "32", "--data", str(tmp_path / "toy.npz"),
                                   "--out", str(tmp_path / "models"), "--channels", "8,8", "--device", "cpu",
                                   "--config", str(cfgfile)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "models/ct-denoise-wdiff/model.safetensors").exists()
    assert (tmp_path / "models/ct-denoise-wdiff/MODEL_CARD.md").read_text().count("train` split") == 1


def test_ema_window_is_capped_to_a_tenth_of_the_run() -> None:
    from engine.train import ema_decay

    assert ema_decay(None, 250) == pytest.approx(0.96)  # window 25 steps, not 200
    assert ema_decay(None, 100_000) == 0.995
    assert ema_decay(0.995, 250) == 0.995  # an explicit value is used as given
    assert 1.0 / (1.0 - ema_decay(None, 1000)) <= 100 + 1e-9


def test_cli_ema_decay_and_size_recorded_in_config_and_card(tmp_path: Path) -> None:
    from node.cli import app

    data = toy_data(n=2, size=32)
    np.savez(tmp_path / "toy.npz", **{k: v for k, v in data.items() if k != "meta"},
             meta=np.array(json.dumps({"toy": True})))
    cfgfile = tmp_path / "c.toml"
    cfgfile.write_text(f'environment = "development"\ndata_dir = "{tmp_path}"\n[engine]\nthreads = 1\n')
    args = ["engine", "train", "ct_to_mr", "--objective", "regression", "--steps", "2", "--batch", "1",
            "--crop", "16", "--n-train", "2", "--size", "32", "--data", str(tmp_path / "toy.npz"),
            "--out", str(tmp_path / "models"), "--channels", "8,8", "--device", "cpu", "--config", str(cfgfile)]
    res = CliRunner().invoke(app, [*args, "--ema-decay", "0.9"])
    assert res.exit_code == 0, res.output
    d = tmp_path / "models/ct-to-mr-wreg"
    tr = json.loads((d / "config.json").read_text())["training"]
    assert tr["ema_decay"] == 0.9 and tr["ema_decay_used"] == 0.9 and tr["size"] == 32
    card = (d / "MODEL_CARD.md").read_text()
    assert "--size 32" in card and "--ema-decay 0.9`" in card and "EMA 0.9 " in card


def test_training_low_dose_uses_the_evaluation_view_count() -> None:
    from engine.degrade import default_angles
    from engine.train import train_angles

    assert train_angles(256) == 180  # data version 1 unchanged at <= 256 px
    assert train_angles(512) == default_angles(512) == 360


def test_robust_ct_batches_vary_the_noise_level_and_drop_the_context() -> None:
    import torch

    data = toy_data(n=4, size=32)  # ld = ct + N(0, 40 HU)

    def stats(robust: bool) -> tuple[list[float], int]:
        tgt, cond = make_batch("ct_denoise", {**data, "nd": data["ld"]}, torch.Generator().manual_seed(1), 200, 32,
                               robust=robust)
        ratios = [float((cond[b, 1] - tgt[b, 0]).std() * 1000 / 40) for b in range(cond.shape[0])]
        single = sum(bool(torch.equal(cond[b, 0], cond[b, 1]) and torch.equal(cond[b, 2], cond[b, 1]))
                     for b in range(cond.shape[0]))
        return ratios, single

    plain, single_plain = stats(False)
    robust, single_robust = stats(True)
    assert single_plain == 0 and min(plain) > 0.85
    assert 20 <= single_robust <= 60  # p_single = 0.2 of 200
    assert min(robust) < 0.2 and sum(r < 0.85 for r in robust) >= 60  # p_scale = 0.5, a ~ U(0.05, 1)
