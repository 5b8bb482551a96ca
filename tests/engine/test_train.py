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
from engine.research.train import TrainConfig, make_batch, train
from tests.support.engine import TINY_ARCH, toy_data



def cli_train_args(tmp_path: Path, task: str, *extra: str) -> list[str]:
    """``synthnode engine train TASK`` on 2 toy phantoms (cached .npz), a tiny UNet, 1 thread."""
    data = toy_data(n=2, size=32)
    np.savez(tmp_path / "toy.npz", **{k: v for k, v in data.items() if k != "meta"},
             meta=np.array(json.dumps({"toy": True})))
    cfgfile = tmp_path / "c.toml"
    cfgfile.write_text(f'environment = "development"\ndata_dir = "{tmp_path}"\n[engine]\nthreads = 1\n')
    return ["engine", "train", task, *extra, "--batch", "1", "--crop", "16", "--n-train", "2", "--size", "32",
            "--data", str(tmp_path / "toy.npz"), "--out", str(tmp_path / "models"), "--channels", "8,8",
            "--device", "cpu", "--config", str(cfgfile)]


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

    res = CliRunner().invoke(app, cli_train_args(tmp_path, "ct_denoise", "--steps", "2"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "models/ct-denoise-wdiff/model.safetensors").exists()
    assert (tmp_path / "models/ct-denoise-wdiff/MODEL_CARD.md").read_text().count("train` split") == 1


def test_ema_window_is_capped_to_a_tenth_of_the_run() -> None:
    from engine.research.train import ema_decay

    assert ema_decay(None, 250) == pytest.approx(0.96)  # window 25 steps, not 200
    assert ema_decay(None, 100_000) == 0.995
    assert ema_decay(0.995, 250) == 0.995  # an explicit value is used as given
    assert 1.0 / (1.0 - ema_decay(None, 1000)) <= 100 + 1e-9


def test_cli_ema_decay_and_size_recorded_in_config_and_card(tmp_path: Path) -> None:
    from node.cli import app

    args = cli_train_args(tmp_path, "ct_to_mr", "--objective", "regression", "--steps", "2")
    res = CliRunner().invoke(app, [*args, "--ema-decay", "0.9"])
    assert res.exit_code == 0, res.output
    d = tmp_path / "models/ct-to-mr-wreg"
    tr = json.loads((d / "config.json").read_text())["training"]
    assert tr["ema_decay"] == 0.9 and tr["ema_decay_used"] == 0.9 and tr["size"] == 32
    card = (d / "MODEL_CARD.md").read_text()
    assert "--size 32" in card and "--ema-decay 0.9`" in card and "EMA 0.9 " in card


def test_training_low_dose_uses_the_evaluation_view_count() -> None:
    from engine.research.degrade import default_angles
    from engine.research.train import train_angles

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


def test_default_batches_are_unchanged_by_the_new_options() -> None:
    """The lesion / full-dose options off: the same random stream and batches as before."""
    import torch

    data = toy_data()
    les = np.zeros(data["ct"].shape, np.uint8)
    a = make_batch("ct_denoise", data, torch.Generator().manual_seed(3), 4, 16, robust=True)
    b = make_batch("ct_denoise", {**data, "les": les}, torch.Generator().manual_seed(3), 4, 16, robust=True,
                   with_lesions=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and b[2].shape == (4, 1, 16, 16)


def test_fulldose_target_pairs_mirror_the_real_scan_protocol() -> None:
    """Derived pairs: target = nd (its ~10 HU noise kept), input - target = sqrt(1 - d) (ld - ct)."""
    import torch

    data = toy_data(n=2, size=32)  # ld - ct ~ N(0, 40 HU), nd - ct ~ N(0, 10 HU), dose 0.25
    tgt, cond = make_batch("ct_denoise", data, torch.Generator().manual_seed(0), 200, 32, fulldose_target=1.0)
    inner = (slice(12, 20), slice(12, 20))  # inside every disc: the clean CT is flat there
    kinds = {"derived": 0, "normal_dose": 0}
    for b in range(tgt.shape[0]):
        t_sd = float(tgt[b, 0][inner].std() * 1000)
        extra = float((cond[b, 1] - tgt[b, 0])[inner].std() * 1000)
        if t_sd < 1e-3:  # the 25 % normal-dose pairs: clean target, input = nd
            kinds["normal_dose"] += 1
            assert 6 < extra < 14
        else:  # target = nd with its own noise; added noise sqrt(0.75) x 40 = 34.6 HU
            kinds["derived"] += 1
            assert 6 < t_sd < 14 and 25 < extra < 45
    assert 25 <= kinds["normal_dose"] <= 75 and kinds["derived"] >= 125
    # off: never a noisy target
    tgt0, _ = make_batch("ct_denoise", data, torch.Generator().manual_seed(0), 50, 32)
    assert all(float(tgt0[b, 0][inner].std()) < 1e-6 for b in range(50))


def test_lesion_weight_and_lesion_crops() -> None:
    import torch

    from engine.research.train import lesion_loss_weight

    data = toy_data(n=2, size=64)
    les = np.zeros(data["ct"].shape, np.uint8)
    les[:, :, 10:14, 50:54] = 1  # one 4 px lesion, off-centre
    d = {**data, "les": les}
    _, _, lz = make_batch("ct_to_mr", d, torch.Generator().manual_seed(0), 40, 16, lesion_crop=1.0,
                          with_lesions=True)
    assert all(lz[b].sum() > 0 for b in range(40))  # every crop holds the lesion
    _, _, lz0 = make_batch("ct_to_mr", d, torch.Generator().manual_seed(0), 40, 16, with_lesions=True)
    assert sum(lz0[b].sum() > 0 for b in range(40)) < 20
    w = lesion_loss_weight(lz, 9.0)
    assert w.shape == (40, 1, 8, 8) and abs(float(w.mean()) - 1) < 1e-5
    inside = w[lz[:, :, ::2, ::2] > 0]
    assert float(inside.min()) > 2 * float(w.min())


def test_init_from_a_model_folder_and_the_card_records_it(tmp_path: Path) -> None:
    kw = dict(task="ct_to_mr", objective="regression", batch=2, crop=16, architecture=dict(TINY_ARCH),
              log_every=1, ckpt_every=10)
    data = toy_data()
    data["les"] = np.zeros(data["ct"].shape, np.uint8)
    data["les"][:, :, 12:16, 12:16] = 1
    a = train(TrainConfig(steps=2, model_id="base", **kw), tmp_path / "a", data)
    b = train(TrainConfig(steps=1, lr=1e-9, warmup=1, model_id="tuned", init_from=str(a), lesion_weight=5.0,
                          lesion_crop=0.5, **kw), tmp_path / "b", data)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(float((wa[k].float() - wb[k].float()).abs().max()) < 1e-4 for k in wa)  # lr ~0: starts at a
    card = (b / "MODEL_CARD.md").read_text()
    digest = hashlib.sha256((a / "model.safetensors").read_bytes()).hexdigest()
    assert f"initialised from `{a}` (base 1.0.0, weights SHA-256 {digest})" in card
    assert "--lesion-weight 5.0 --lesion-crop 0.5" in card and "lesion emphasis" in card


def test_own_texture_targets_are_correlated_textures_not_the_phantom_noise() -> None:
    import torch

    data = toy_data(n=2, size=64)
    data["nd"] = data["ct"].copy()  # the phantom's own noise 0: any noise in the target is the texture
    tgt, cond = make_batch("ct_denoise", data, torch.Generator().manual_seed(0), 60, 64, fulldose_target=1.0,
                           own_texture=1.0)
    inner = (slice(26, 38), slice(26, 38))
    textured = 0
    for b in range(tgt.shape[0]):
        t = tgt[b, 0][inner] * 1000
        if float(t.std()) < 1e-3:
            continue  # a normal-dose pair (clean target)
        textured += 1
        t = t - t.mean()
        assert 0.5 < float(t.std()) < 40
        lag1 = float((t[:, 1:] * t[:, :-1]).mean() / (t * t).mean())
        assert lag1 > 0.2  # blurred: neighbours correlate (white noise would give ~0)
        extra = float((cond[b, 1] - tgt[b, 0])[inner].std() * 1000)
        assert 25 < extra < 45  # the simulated low-dose part is unchanged
    assert textured >= 30


def test_sharp_shapes_paste_pixel_sharp_objects_and_keep_the_noise() -> None:
    """Inside a pasted shape the target is one constant (air or a fixed HU), the input keeps the
    pair's noise there (input - target unchanged), and the default stream is unchanged when off."""
    import torch

    from engine.research.train import CT_SCALE

    data = toy_data(n=2, size=64)
    ramp = np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64) * 37.0  # no two clean values alike
    for k in ("ct", "ld", "nd"):
        data[k] = data[k] + ramp
    g = torch.Generator
    t0, c0 = make_batch("ct_denoise", data, g().manual_seed(5), 40, 32, robust=True)
    t1, c1 = make_batch("ct_denoise", data, g().manual_seed(5), 40, 32, robust=True, sharp_shapes=0.0)
    assert torch.equal(t0, t1) and torch.equal(c0, c1)
    tgt, cond = make_batch("ct_denoise", data, g().manual_seed(5), 40, 32, sharp_shapes=1.0)
    ref, refc = make_batch("ct_denoise", data, g().manual_seed(5), 40, 32)
    n_air = n_const = 0
    for b in range(40):
        t = tgt[b, 0] * CT_SCALE
        vals, counts = torch.unique(t, return_counts=True)
        top = float(vals[counts.argmax()])
        assert int(counts.max()) >= 2  # a shape: pixels of exactly one value
        if abs(top + 1000.0) < 1e-3:
            n_air += 1
        else:
            assert -300.01 <= top <= 1200.01
            n_const += 1
    assert n_air > 5 and n_const > 5
    # the same pairs without shapes have the same noise where the image was not replaced
    # (the shape draw comes after the crop draw, so only the following batch items shift)
    first = 0
    assert torch.allclose((cond[first, 1] - tgt[first, 0]), (refc[first, 1] - ref[first, 0]), atol=1e-5)
    edges = (tgt[:, 0, :, 1:] - tgt[:, 0, :, :-1]).abs() * CT_SCALE
    assert float(edges.max()) > 500  # one-pixel steps of hundreds of HU: no partial volume


def test_ssim_weight_adds_a_structure_term_for_ct_to_mr_only(tmp_path: Path) -> None:
    kw = dict(objective="regression", batch=2, crop=16, architecture=dict(TINY_ARCH), log_every=1, ckpt_every=10)
    data = toy_data()
    train(TrainConfig(task="ct_to_mr", steps=2, model_id="plain", **kw), tmp_path / "a", data)
    b = train(TrainConfig(task="ct_to_mr", steps=2, model_id="ssim", ssim_weight=0.5, **kw), tmp_path / "b", data)
    la = [json.loads(x)["loss"] for x in (tmp_path / "a/.runs/plain/metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b/.runs/ssim/metrics.jsonl").read_text().splitlines()]
    assert lb[0] > la[0] + 0.01  # same first batch and weights; the (1 - SSIM) term adds to it
    assert "structure term" in (b / "MODEL_CARD.md").read_text() and "--ssim-weight 0.5" in (b / "MODEL_CARD.md").read_text()
    with pytest.raises(ValueError, match="ssim_weight"):
        train(TrainConfig(task="ct_denoise", steps=1, model_id="x", ssim_weight=0.5, **kw), tmp_path / "c", data)


def test_noise_scaling_keeps_the_own_texture_in_the_input() -> None:
    """Robust noise scaling on own-texture pairs scales the added noise only: input - target is
    a x the added noise, never a texture the input lacks (the target would then hold texture the
    network cannot see, teaching it to amplify)."""
    import torch

    data = toy_data(n=2, size=64)
    data["nd"] = data["ct"].copy() + 40.0  # a distinct full-dose image: mixing it in shows as an offset
    tgt, cond = make_batch("ct_denoise", data, torch.Generator().manual_seed(1), 80, 64, robust=True,
                           fulldose_target=1.0, own_texture=1.0)
    inner = (slice(26, 38), slice(26, 38))
    textured = 0
    for b in range(tgt.shape[0]):
        t = tgt[b, 0][inner] * 1000
        if float(t.std()) < 1e-3:
            continue
        textured += 1
        diff = (cond[b, 1] - tgt[b, 0])[inner] * 1000  # a x sqrt(0.75) x N(0, 40 HU): mean ~0 (SE <= 3 HU)
        assert abs(float(diff.mean())) < 12
        assert float(diff.std()) < 45
    assert textured >= 30


def test_average_models_is_the_weighted_mean_and_the_card_names_the_sources(tmp_path: Path) -> None:
    from engine.research.train import average_models
    from node.cli import app

    kw = dict(task="ct_to_mr", objective="regression", batch=2, crop=16, architecture=dict(TINY_ARCH),
              log_every=1, ckpt_every=10)
    a = train(TrainConfig(steps=2, model_id="a", seed=0, **kw), tmp_path / "a", toy_data())
    b = train(TrainConfig(steps=2, model_id="b", seed=1, **kw), tmp_path / "b", toy_data())
    res = CliRunner().invoke(app, ["engine", "average", str(b), str(a), "--out", str(tmp_path / "soup"),
                                   "--weight", "0.25", "--weight", "0.75", "--version", "2.0.0",
                                   "--model-id", "c2m"])
    assert res.exit_code == 0, res.output
    soup = tmp_path / "soup"
    wa, wb, ws = (load_file(str(d / "model.safetensors")) for d in (a, b, soup))
    assert any(not np.allclose(wa[k], wb[k]) for k in wa)
    for k in wa:
        np.testing.assert_allclose(ws[k].numpy(), 0.25 * wb[k].numpy() + 0.75 * wa[k].numpy(), rtol=1e-5, atol=1e-6)
    cfg = json.loads((soup / "config.json").read_text())
    assert (cfg["model_id"], cfg["version"]) == ("c2m", "2.0.0")
    assert [(x["model_id"], x["weight"]) for x in cfg["training"]["weight_average"]] == [("b", 0.25), ("a", 0.75)]
    m = load_model_dir(soup)
    card = (soup / "MODEL_CARD.md").read_text()
    assert f"weights SHA-256: `{m.weights_sha256}`" in card
    assert "b 1.0.0 (weight 0.25" in card and "a 1.0.0 (weight 0.75" in card
    assert "Not evaluated yet" in card  # the sources' held-out metrics are not carried over
    out = run_task("ct_to_mr", Volume(toy_data()["ct"][0], (2.0, 1.0, 1.0), Intensity.HU), model=m,
                   params={"target": "t1w"}, seed=0, device="cpu").outputs[0]
    assert np.isfinite(out.data).all()
    # refusals: weights that do not sum to 1, a different task, writing over a source
    with pytest.raises(ValueError, match="sum"):
        average_models([a, b], tmp_path / "x", weights=[0.5, 0.6])
    c = train(TrainConfig(task="ct_denoise", steps=1, batch=2, crop=16, architecture=dict(TINY_ARCH),
                          model_id="c", log_every=1, ckpt_every=10), tmp_path / "c", toy_data())
    with pytest.raises(ValueError, match="differs"):
        average_models([a, c], tmp_path / "y")
    res = CliRunner().invoke(app, ["engine", "average", str(a), str(b), "--out", str(a)])
    assert res.exit_code != 0 and "new folder" in res.output


def test_mr_own_noise_targets_keep_their_noise_and_the_input_adds_more(tmp_path: Path) -> None:
    import torch

    from node.cli import app

    data = toy_data(size=48)  # t1w: a flat 600 disc on 0
    inside = np.zeros((48, 48), bool)
    inside[18:30, 18:30] = True  # well inside every disc (radius >= 12 px)

    def batch(p: float, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        # crop = image: no geometric crop, only rotations / flips, which keep the centre block
        return make_batch("mr_denoise", data, torch.Generator().manual_seed(seed), 6, 48, own_noise=p)

    t0, c0 = batch(0.0)
    t1, c1 = batch(1.0)
    sd = lambda x: float(x[:, 0][:, inside].std(dim=1).mean())  # noqa: E731
    assert sd(t0) < 1e-6  # plain pairs: the target is the flat phantom
    assert sd(t1) > 0.01  # own-noise pairs: the target keeps noise / texture
    assert sd(c1[:, 1:2]) > 1.5 * sd(t1)  # and the input has more on top
    t0b, c0b = make_batch("mr_denoise", data, torch.Generator().manual_seed(5), 6, 48)
    assert torch.equal(t0, t0b) and torch.equal(c0, c0b)  # off: the default stream is unchanged
    tc = TrainConfig(task="mr_denoise", objective="regression", steps=1, batch=2, crop=16,
                     architecture=dict(TINY_ARCH), own_noise=0.5, model_id="own", log_every=1, ckpt_every=10)
    d = train(tc, tmp_path, toy_data())
    card = (d / "MODEL_CARD.md").read_text()
    assert "own-noise targets" in card and "--own-noise 0.5" in card
    bad = CliRunner().invoke(app, ["engine", "train", "ct_denoise", "--own-noise", "0.5", "--steps", "1",
                                   "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "--own-noise applies to mr_denoise only" in bad.output


def test_card_refresh_keeps_held_out_metrics_with_their_own_headings(tmp_path: Path) -> None:
    """`synthnode engine package DIR` without --metrics-md keeps the metrics section whole,
    also when it holds `## ` headings pasted from an evaluation report (it used to end there)."""
    from engine.research.train import write_model_card

    tc = TrainConfig(task="ct_denoise", steps=1, batch=2, crop=16, architecture=dict(TINY_ARCH),
                     model_id="m", log_every=1, ckpt_every=10)
    d = train(tc, tmp_path, toy_data(), data_description="toy discs")
    metrics = "From a report:\n\n## CT restoration, phantoms\n\n| a | b |\n\n## Real slices\n\nmore"
    write_model_card(d, metrics_md=metrics)
    write_model_card(d)  # refresh without new metrics
    card = (d / "MODEL_CARD.md").read_text()
    assert "## Real slices\n\nmore" in card and "toy discs" in card
    assert card.count("## Limitations") == 1


def test_x0_prediction_diffusion_trains_from_a_regressor_and_samples_from_noise(tmp_path: Path) -> None:
    """prediction = "x0": the loss is the regressor's (MSE to the clean sub-bands), a
    regressor's weights are a warm start, the config carries the prediction, train_t_max and
    the sampling defaults, and restoration then samples from pure noise (strength 1)."""
    kw = dict(task="ct_denoise", batch=2, crop=16, architecture=dict(TINY_ARCH), log_every=1, ckpt_every=10)
    data = toy_data()
    reg = train(TrainConfig(objective="regression", steps=2, model_id="reg", **kw), tmp_path / "r", data)
    d = train(TrainConfig(objective="diffusion", prediction="x0", train_t_max=1.0, steps=2, init_from=str(reg),
                          sampling={"steps": 3, "strength": 1.0, "threshold_percentile": 0}, model_id="dx0", **kw),
              tmp_path / "d", data)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["prediction"] == "x0" and cfg["train_t_max"] == 1.0
    assert cfg["sampling"]["ct_denoise"] == {"steps": 3, "strength": 1.0, "threshold_percentile": 0.0}
    card = (d / "MODEL_CARD.md").read_text()
    assert "clean-sample (x0) prediction" in card and "training times up to 1.0 T" in card
    m = load_model_dir(d)
    vol = Volume(data["ld"][0], (2.0, 1.0, 1.0), Intensity.HU)
    out = run_task("ct_denoise", vol, model=m, params={}, seed=0, device="cpu")
    assert out.provenance.parameters["strength"] == 1.0 and out.provenance.parameters["steps"] == 3
    again = run_task("ct_denoise", vol, model=m, params={}, seed=0, device="cpu")
    assert np.array_equal(out.outputs[0].data, again.outputs[0].data)  # deterministic with the seed
    other = run_task("ct_denoise", vol, model=m, params={}, seed=1, device="cpu")
    assert not np.array_equal(out.outputs[0].data, other.outputs[0].data)  # a sample, not a fixed map
    assert "--prediction x0 --train-t-max 1.0 --sample steps=3 --sample strength=1.0" in card
    assert "sampling defaults changed after training" not in card
    # a validation-split choice edited into config.json afterwards is named on the card
    from engine.research.train import write_model_card

    cfg["sampling"]["ct_denoise"]["steps"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    write_model_card(d)
    assert ('sampling defaults changed after training (chosen on the validation split): {"steps": 2, '
            in (d / "MODEL_CARD.md").read_text())
    # velocity models keep their config as before (no new keys beyond "prediction")
    v = train(TrainConfig(objective="diffusion", steps=1, model_id="vel", **kw), tmp_path / "v", data)
    vcfg = json.loads((v / "config.json").read_text())
    assert vcfg["prediction"] == "velocity" and vcfg["train_t_max"] == 0.6
    assert "velocity prediction" in (v / "MODEL_CARD.md").read_text()


def test_x0_recipe_refusals(tmp_path: Path) -> None:
    from engine.tasks import TaskInputError
    from engine.research.train import model_config

    with pytest.raises(ValueError, match="prediction applies to the diffusion objective"):
        model_config(TrainConfig(task="ct_denoise", objective="regression", prediction="x0"))
    with pytest.raises(ValueError, match="prediction must be one of"):
        model_config(TrainConfig(task="ct_denoise", prediction="eps"))
    with pytest.raises(ValueError, match="above train_t_max"):  # preset 0.6: never trained at t = T
        model_config(TrainConfig(task="ct_denoise", prediction="x0", sampling={"strength": 1.0}))
    with pytest.raises(ValueError, match="unknown parameter"):
        model_config(TrainConfig(task="ct_denoise", sampling={"target": "t1w"}))
    with pytest.raises(TaskInputError, match="steps"):
        model_config(TrainConfig(task="ct_denoise", sampling={"steps": 99}))
    with pytest.raises(ValueError, match="p_uncond applies to the diffusion objective"):
        model_config(TrainConfig(task="ct_augment", objective="regression", p_uncond=1.0))
    with pytest.raises(ValueError, match=r"p_uncond must be in \[0, 1\]"):
        model_config(TrainConfig(task="ct_augment", p_uncond=1.5))
    assert model_config(TrainConfig(task="ct_augment"))["p_uncond"] == 0.15  # the preset's
    assert model_config(TrainConfig(task="ct_augment", p_uncond=1.0))["p_uncond"] == 1.0
    # at run time: a velocity model trained up to 0.6 T refuses a start at 1.0
    kw = dict(task="ct_denoise", batch=2, crop=16, architecture=dict(TINY_ARCH), steps=1)
    m = load_model_dir(train(TrainConfig(model_id="v", **kw), tmp_path, toy_data()))
    vol = Volume(toy_data()["ld"][0], (2.0, 1.0, 1.0), Intensity.HU)
    with pytest.raises(TaskInputError, match="train_t_max"):
        run_task("ct_denoise", vol, model=m, params={"strength": 1.0}, seed=0, device="cpu")


def test_cli_x0_options_and_their_refusals(tmp_path: Path) -> None:
    from node.cli import app

    base = cli_train_args(tmp_path, "ct_denoise", "--steps", "1")
    run = CliRunner().invoke
    res = run(app, [*base, "--prediction", "x0", "--train-t-max", "1.0", "--sample", "steps=4",
                    "--sample", "strength=1.0", "--sample", "threshold_percentile=0"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "models/ct-denoise-wdiff/config.json").read_text())
    assert cfg["prediction"] == "x0" and cfg["sampling"]["ct_denoise"]["steps"] == 4
    assert cfg["sampling"]["ct_denoise"]["strength"] == 1.0 and cfg["train_t_max"] == 1.0
    for extra, msg in ((["--objective", "regression", "--prediction", "x0"], "apply to --objective diffusion"),
                       (["--sample", "strength=1.0"], "above train_t_max"),
                       (["--sample", "steps"], "needs KEY=VALUE"),
                       (["--sample", "steps=99"], "must be <= 8")):
        res = run(app, [*base, *extra])
        assert res.exit_code != 0 and msg in " ".join(res.output.split()), (extra, res.output)


def test_cli_augment_recipe_options(tmp_path: Path) -> None:
    """--p-uncond and --fulldose-target on the augmentation recipe (the 2.0.0 augment model's)."""
    from node.cli import app

    run = CliRunner().invoke
    base = cli_train_args(tmp_path, "ct_augment", "--steps", "1")
    res = run(app, [*base, "--prediction", "x0", "--p-uncond", "1.0", "--fulldose-target", "1.0"])
    assert res.exit_code == 0, res.output
    d = tmp_path / "models/ct-augment-wdiff"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["p_uncond"] == 1.0 and cfg["training"]["fulldose_target"] == 1.0
    card = (d / "MODEL_CARD.md").read_text()
    assert "condition dropout 1.0" in card and "--p-uncond 1.0" in card
    assert "sampling defaults changed" not in card
    # sampling edited after training (a validation-split choice): the card says so (the recipe's
    # task is ct_augment, its inference task and sampling key "augment")
    from engine.research.train import write_model_card

    cfg["sampling"]["augment"] = {**cfg["sampling"]["augment"], "strength": 0.05}
    (d / "config.json").write_text(json.dumps(cfg))
    write_model_card(d)
    assert '"strength": 0.05' in (d / "MODEL_CARD.md").read_text().split("sampling defaults changed after training")[1]
    for extra, msg in ((["--objective", "regression", "--p-uncond", "1"], "apply to --objective diffusion"),):
        res = run(app, [*base, *extra])
        assert res.exit_code != 0 and msg in " ".join(res.output.split()), (extra, res.output)
    res = run(app, [*cli_train_args(tmp_path, "mr_denoise", "--steps", "1"), "--fulldose-target", "0.5"])
    assert res.exit_code != 0 and "applies to ct_denoise and ct_augment" in " ".join(res.output.split())
