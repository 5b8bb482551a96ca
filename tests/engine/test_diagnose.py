"""engine.research.diagnose: raw (non-EMA) checkpoint weights as a model folder, validation-split scoring."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from engine.research.diagnose import diagnose, raw_model_dir
from engine.models import load_model_dir
from engine.research.train import TrainConfig, train
from tests.support.engine import TINY_ARCH, toy_data


def test_raw_model_dir_holds_the_checkpoint_net_not_the_ema(tmp_path: Path) -> None:
    tc = TrainConfig(task="ct_denoise", objective="regression", steps=3, batch=2, crop=16,
                     architecture=dict(TINY_ARCH), model_id="m", ema_decay=0.99)
    mdir = train(tc, tmp_path, toy_data())
    raw = raw_model_dir(tmp_path / ".runs/m", mdir, tmp_path / "raw")
    ck = load_file(str(tmp_path / ".runs/m/checkpoint.safetensors"))
    w_raw, w_ema = load_file(str(raw / "model.safetensors")), load_file(str(mdir / "model.safetensors"))
    assert w_raw.keys() == w_ema.keys()
    for k in w_raw:
        assert np.array_equal(w_raw[k].numpy(), ck[f"net.{k}"].numpy())
    assert any(not np.array_equal(w_raw[k].numpy(), w_ema[k].numpy()) for k in w_raw)
    assert load_model_dir(raw).model_id == "m"


def test_diagnose_scores_models_and_baselines_on_validation_phantoms(tmp_path: Path) -> None:
    tc = TrainConfig(task="ct_denoise", objective="regression", steps=2, batch=2, crop=16,
                     architecture=dict(TINY_ARCH), model_id="m")
    mdir = train(tc, tmp_path, toy_data())
    rows = diagnose("ct_denoise", [mdir], [tmp_path / ".runs/m"], n=1, size=64, n_slices=1,
                    doses=(0.25,), targets=())
    methods = [r["method"] for r in rows]
    assert methods[:2] == ["input (no processing)", "NLM"] and len(methods) == 4
    assert all(np.isfinite(r["psnr"]) for r in rows)
    assert "m raw step 2 " in methods[2] and methods[3].startswith("m EMA ")
    assert all(r["dose"] == 0.25 and {"psnr", "ssim", "noise_sd"} <= r.keys() for r in rows)
    assert json.loads(json.dumps(rows)) == rows
