"""Task registry: contracts, determinism, HU round trip, provenance, model loading."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine.api import Intensity, Volume, load_model, run_task
from engine.models import LoadedModel, ModelLoadError, sha256_hex
from engine.tasks import (
    TASKS,
    TaskInputError,
    context_stack,
    default_batch_slices,
    denormalise,
    normalise,
)
from engine.research.train import TrainConfig, initial_model
from tests.support.engine import TINY_ARCH
from tests.support.engine import tiny_model as tiny



def ct_volume(z: int = 3, n: int = 16, seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    data = rng.normal(40, 30, (z, n, n)).astype(np.float32)
    data[:, :2] = -1000.0
    return Volume(data, (2.0, 0.7, 0.7), Intensity.HU)


def mr_volume(z: int = 2, n: int = 16) -> Volume:
    rng = np.random.default_rng(1)
    return Volume(np.abs(rng.normal(300, 50, (z, n, n))).astype(np.float32), (3.0, 1.0, 1.0), Intensity.MR_T2W)


class _ZeroResidual(torch.nn.Module):
    """Velocity towards a zero residual: the restoration model that changes nothing."""

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        xt = x[:, :4]
        tau = (timesteps.float() / 1000).view(-1, 1, 1, 1)
        return -xt / tau


class _ConstResidual(torch.nn.Module):
    """Velocity towards a constant residual c (in residual units)."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        xt = x[:, :4]
        target = torch.zeros_like(xt)
        target[:, 0] = 2.0 * self.c  # LL band of a constant image c is 2c (orthonormal Haar)
        tau = (timesteps.float() / 1000).view(-1, 1, 1, 1)
        return target - (xt - (1 - tau) * target) / tau


def test_registry_has_the_tasks_with_contracts() -> None:
    assert set(TASKS) == {"ct_denoise", "mr_denoise", "ct_to_mr", "augment", "ct_sparse_view",
                          "mr_undersampled"}
    d = TASKS["ct_to_mr"].describe()
    assert d["params"]["target"]["choices"] == ["t1w", "t2w"]
    assert d["input_intensities"] == ["HU"]


def test_hu_normalisation_round_trip() -> None:
    hu = np.array([-1024.0, -1000.0, 0.0, 40.0, 1000.0, 3071.0], np.float32)
    x, st = normalise(hu, {"kind": "hu", "scale": 1000.0})
    assert np.allclose(denormalise(x, {"kind": "hu"}, st), hu, atol=1e-3)
    mr = np.linspace(0, 800, 50).astype(np.float32)
    x, st = normalise(mr, {"kind": "percentile", "q": 0.995})
    assert x.max() == pytest.approx(1.0, abs=0.02)
    assert np.allclose(denormalise(x, {"kind": "percentile"}, st), mr, atol=1e-3)


def test_hu_preserved_end_to_end_with_a_perfect_network() -> None:
    m = tiny("ct_denoise")
    assert m.config["io"]["residual_scale"] == 50.0
    m.net = _ZeroResidual()
    vol = ct_volume(z=4, n=32)
    for steps in (1, 2):
        out = run_task("ct_denoise", vol, model=m, params={"steps": steps, "threshold_percentile": 0.0},
                       seed=3, device="cpu").outputs[0]
        assert out.intensity == Intensity.HU and out.spacing == vol.spacing
        assert np.abs(out.data - vol.data).max() < 0.05  # HU
    # a residual of 1 (network units) is 1 / 50 * 1000 HU = 20 HU
    m.net = _ConstResidual(1.0)
    out = run_task("ct_denoise", vol, model=m, params={"threshold_percentile": 0.0}, seed=3).outputs[0]
    assert np.allclose(out.data - vol.data, 20.0, atol=0.05)


def test_context_stack_order_and_edges() -> None:
    x = torch.arange(4.0).view(4, 1, 1, 1)
    s = context_stack(x, 1)[:, :, 0, 0]
    assert s.tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]


def test_ct_denoise_shapes_determinism_and_provenance() -> None:
    m = tiny("ct_denoise")
    vol = ct_volume()
    a = run_task("ct_denoise", vol, model=m, params={}, seed=7, device="cpu")
    b = run_task("ct_denoise", vol, model=m, params={}, seed=7, device="cpu")
    c = run_task("ct_denoise", vol, model=m, params={}, seed=8, device="cpu")
    assert a.outputs[0].data.shape == vol.data.shape and a.outputs[0].data.dtype == np.float32
    assert np.array_equal(a.outputs[0].data, b.outputs[0].data)
    assert not np.array_equal(a.outputs[0].data, c.outputs[0].data)
    p = a.provenance
    assert (p.task, p.model_id, p.seed, p.device, p.steps) == ("ct_denoise", m.model_id, 7, "cpu", 2)
    assert p.weights_sha256 == m.weights_sha256 and len(p.weights_sha256) == 64
    assert p.parameters == {"steps": 2, "strength": 0.3, "threshold_percentile": 0.995}


@dataclasses.dataclass
class Opt:
    """What run_task reads of settings.engine (``batch_slices`` None: unset)."""

    batch_slices: int | None = None
    bf16_on_gpu: bool = True
    threads: int = 0
    device: str = "cpu"


def test_batching_does_not_change_the_result() -> None:
    m = tiny("ct_denoise")
    vol = ct_volume(z=5)

    a = run_task("ct_denoise", vol, model=m, params={}, seed=1, options=Opt(1)).outputs[0].data
    b = run_task("ct_denoise", vol, model=m, params={}, seed=1, options=Opt(8)).outputs[0].data
    assert np.allclose(a, b, atol=1e-3)


def test_default_batch_is_one_slice_on_cpu_and_recorded() -> None:
    m = tiny("ct_denoise")

    assert default_batch_slices("cpu", 512, 512) == 1 and default_batch_slices("cpu", 256, 256) == 4
    assert default_batch_slices("cpu", 1024, 1024) == 1 and default_batch_slices("cuda", 512, 512) == 8
    p = run_task("ct_denoise", ct_volume(z=2, n=512), model=m, params={}, seed=0, options=Opt()).provenance
    assert p.extra["batch_slices"] == 1
    p = run_task("ct_denoise", ct_volume(z=2, n=256), model=m, params={}, seed=0, options=Opt()).provenance
    assert p.extra["batch_slices"] == 4
    p = run_task("ct_denoise", ct_volume(), model=m, params={}, seed=0, options=Opt(batch_slices=3)).provenance
    assert p.extra["batch_slices"] == 3


def test_loaded_weights_are_channels_last_and_give_the_contiguous_result() -> None:
    m = tiny("ct_denoise")
    convs = [mod.weight for mod in m.net.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    vol = ct_volume(z=2, n=32)
    a = run_task("ct_denoise", vol, model=m, params={}, seed=4).outputs[0].data
    m.net.to(memory_format=torch.contiguous_format)
    assert any(not w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    b = run_task("ct_denoise", vol, model=m, params={}, seed=4).outputs[0].data
    assert np.allclose(a, b, atol=1e-2)  # HU; the layout changes float rounding only


def test_contract_violations_are_refused() -> None:
    m = tiny("ct_denoise")
    with pytest.raises(TaskInputError, match=">= 16"):
        run_task("ct_denoise", ct_volume(n=8), model=m, params={}, seed=0)
    with pytest.raises(TaskInputError, match="intensity"):
        run_task("ct_denoise", mr_volume(), model=m, params={}, seed=0)
    with pytest.raises(TaskInputError, match="unknown parameter"):
        run_task("ct_denoise", ct_volume(), model=m, params={"stepz": 1}, seed=0)
    with pytest.raises(TaskInputError, match="<="):
        run_task("ct_denoise", ct_volume(), model=m, params={"steps": 9}, seed=0)
    with pytest.raises(TaskInputError, match="integer"):
        run_task("ct_denoise", ct_volume(), model=m, params={"steps": "2"}, seed=0)
    with pytest.raises(TaskInputError, match="not made for"):
        run_task("ct_to_mr", ct_volume(), model=m, params={}, seed=0)
    with pytest.raises(TaskInputError, match="unknown task"):
        run_task("ct_superres", ct_volume(), model=m, params={}, seed=0)
    with pytest.raises(TaskInputError, match="seed"):
        run_task("ct_denoise", ct_volume(), model=m, params={}, seed=-1)
    bad = ct_volume()
    bad.data[0, 5, 5] = np.nan
    with pytest.raises(TaskInputError, match="NaN"):
        run_task("ct_denoise", bad, model=m, params={}, seed=0)
    mr = tiny("mr_denoise")
    with pytest.raises(TaskInputError, match="expects CT"):
        run_task("augment", mr_volume(), model=tiny("ct_augment"), params={}, seed=0)
    with pytest.raises(TaskInputError, match="not made for"):
        run_task("augment", ct_volume(), model=mr, params={}, seed=0)


def test_mr_denoise_keeps_units() -> None:
    m = tiny("mr_denoise")
    m.net = _ZeroResidual()
    vol = mr_volume()
    out = run_task("mr_denoise", vol, model=m, params={"threshold_percentile": 0.0}, seed=0).outputs[0]
    assert out.intensity == Intensity.MR_T2W
    assert np.abs(out.data - vol.data).max() < 0.05


def test_ct_to_mr_targets() -> None:
    m = tiny("ct_to_mr")
    vol = ct_volume()
    r1 = run_task("ct_to_mr", vol, model=m, params={"target": "t1w"}, seed=0)
    r2 = run_task("ct_to_mr", vol, model=m, params={"target": "t2w", "steps": 8}, seed=0)
    assert r1.outputs[0].intensity == Intensity.MR_T1W and r2.outputs[0].intensity == Intensity.MR_T2W
    assert r1.provenance.steps == 6 and r2.provenance.steps == 8
    assert r1.outputs[0].data.shape == vol.data.shape
    assert not np.allclose(r1.outputs[0].data, r2.outputs[0].data)
    with pytest.raises(TaskInputError, match="one of"):
        run_task("ct_to_mr", vol, model=m, params={"target": "flair"}, seed=0)


def test_regression_model_is_one_step_and_seed_free() -> None:
    m = tiny("ct_to_mr", objective="regression")
    vol = ct_volume()
    a = run_task("ct_to_mr", vol, model=m, params={"target": "t2w"}, seed=0)
    b = run_task("ct_to_mr", vol, model=m, params={"target": "t2w"}, seed=5)
    assert a.provenance.steps == 1 and a.provenance.extra["objective"] == "regression"
    assert np.array_equal(a.outputs[0].data, b.outputs[0].data)
    with pytest.raises(TaskInputError):
        run_task("augment", vol, model=tiny("ct_augment", objective="regression"), params={}, seed=0)


def test_augment_gives_n_distinct_reproducible_variants() -> None:
    m = tiny("ct_augment")
    vol = ct_volume()
    r = run_task("augment", vol, model=m, params={"n": 3, "strength": 0.4, "steps": 3}, seed=11)
    assert len(r.outputs) == 3 and all(o.data.shape == vol.data.shape for o in r.outputs)
    assert not np.array_equal(r.outputs[0].data, r.outputs[1].data)
    again = run_task("augment", vol, model=m, params={"n": 3, "strength": 0.4, "steps": 3}, seed=11)
    assert all(np.array_equal(a.data, b.data) for a, b in zip(r.outputs, again.outputs))
    assert len(r.provenance.extra["variant_seeds"]) == 3


def test_load_model_refuses_bad_bytes_and_digests() -> None:
    cfg, weights = initial_model(TrainConfig(task="ct_denoise", architecture=dict(TINY_ARCH)))
    with pytest.raises(ModelLoadError, match="SHA-256"):
        load_model(cfg, weights, "0" * 64)
    junk = b"\x80\x04not a safetensors file"
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(cfg, junk, sha256_hex(junk))
    other = dict(cfg, architecture={**TINY_ARCH, "channels": [8, 16]})
    with pytest.raises(ModelLoadError, match="architecture"):
        load_model(other, weights, sha256_hex(weights))
    with pytest.raises(ModelLoadError, match="lacks"):
        load_model({k: v for k, v in cfg.items() if k != "io"}, weights, sha256_hex(weights))
    with pytest.raises(ModelLoadError, match="unknown prediction"):
        load_model(dict(cfg, prediction="epsilon"), weights, sha256_hex(weights))


def _randomised(m: LoadedModel, seed: int = 0) -> LoadedModel:
    """The tiny model with random (non-zero) output weights: a net with no symmetry."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def test_ensemble_is_the_mean_of_flipped_predictions_and_equivariant() -> None:
    m = _randomised(tiny("ct_denoise", objective="regression", seed=2))
    vol = ct_volume(z=3, n=32, seed=4)

    def run(v: Volume, **p: object) -> np.ndarray:
        return run_task("ct_denoise", v, model=m, params=p, seed=0).outputs[0].data

    flipped = Volume(np.ascontiguousarray(vol.data[:, :, ::-1]), vol.spacing, vol.intensity)
    one = run(vol)
    assert np.abs(one - vol.data).max() > 1.0  # the network does something
    assert np.allclose(run(vol, ensemble=2), 0.5 * (one + run(flipped)[:, :, ::-1]), atol=1e-3)
    assert not np.allclose(run(vol, ensemble=2), one, atol=1e-2)
    # the full dihedral group makes the output exactly equivariant to rotating the input
    rot = Volume(np.ascontiguousarray(np.rot90(vol.data, 1, axes=(1, 2))), vol.spacing, vol.intensity)
    assert np.allclose(run(rot, ensemble=8), np.rot90(run(vol, ensemble=8), 1, axes=(1, 2)), atol=1e-3)
    assert not np.allclose(run(rot), np.rot90(one, 1, axes=(1, 2)), atol=1e-2)


@pytest.mark.parametrize("target", ["t1w", "t2w"])
def test_ct_to_mr_ensemble_averages_the_flipped_predictions_of_its_channel(target: str) -> None:
    # two output channels (t1w, t2w): the ensemble accumulates images, not Haar sub-bands
    # (a (z, 8, H, W) accumulator crashed with "size of tensor a (8) must match ... (2)")
    m = _randomised(tiny("ct_to_mr", objective="regression", seed=3))
    vol = ct_volume(z=2, n=32, seed=5)

    def run(v: Volume, **p: object) -> np.ndarray:
        return run_task("ct_to_mr", v, model=m, params={"target": target, **p}, seed=0).outputs[0].data

    flipped = Volume(np.ascontiguousarray(vol.data[:, :, ::-1]), vol.spacing, vol.intensity)
    one = run(vol)
    two = run(vol, ensemble=2)
    assert two.shape == vol.data.shape
    # the output is clamped at 0 after averaging: compare where neither prediction is clamped
    ref = 0.5 * (one + run(flipped)[:, :, ::-1])
    ok = (one > 0) & (run(flipped)[:, :, ::-1] > 0)
    assert ok.mean() > 0.2 and np.allclose(two[ok], ref[ok], atol=1e-2)
    assert not np.allclose(two, one, atol=1e-2)


def test_ensemble_default_from_the_model_config_and_refusals() -> None:
    m = _randomised(tiny("ct_denoise", objective="regression"))
    vol = ct_volume(z=2, n=32)
    base = run_task("ct_denoise", vol, model=m, params={}, seed=0)
    assert "ensemble" not in base.provenance.parameters
    m.config["sampling"]["ct_denoise"] = {**m.config["sampling"]["ct_denoise"], "ensemble": 2}
    r = run_task("ct_denoise", vol, model=m, params={}, seed=0)
    assert r.provenance.parameters["ensemble"] == 2
    assert np.array_equal(r.outputs[0].data, run_task("ct_denoise", vol, model=m, params={"ensemble": 2},
                                                       seed=0).outputs[0].data)
    assert not np.array_equal(r.outputs[0].data, base.outputs[0].data)
    with pytest.raises(TaskInputError, match="ensemble"):
        run_task("ct_denoise", vol, model=m, params={"ensemble": 3}, seed=0)
    with pytest.raises(TaskInputError, match="regression"):
        run_task("ct_denoise", vol, model=tiny("ct_denoise"), params={"ensemble": 2}, seed=0)


def test_lowpass_and_ilvr() -> None:
    from engine.nets import ilvr, lowpass

    const = torch.full((1, 1, 20, 24), 3.5)
    assert torch.allclose(lowpass(const, (2.0, 3.0)), const, atol=1e-5)  # replicated borders
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 1, 32, 32, generator=g)
    assert torch.allclose(ilvr(ref, lowpass(ref, (1.5, 1.5)), (1.5, 1.5)), ref, atol=1e-6)
    # a coarse offset of the prediction is replaced by the reference's coarse content
    x0 = ref + 5.0
    out = ilvr(x0, lowpass(ref, (1.5, 1.5)), (1.5, 1.5))
    assert torch.allclose(out, ref, atol=1e-4)


def test_augment_guidance_keeps_the_coarse_image() -> None:
    """keep_sigma_mm: every variant's coarse content (a Gaussian 2x wider than the guidance)
    is the received image's, far closer than without guidance at the same seed (a random
    network's output, +-1000 HU of fine junk: measured 0.09x); the fine content still varies
    between variants."""
    from engine.nets import lowpass

    m = _randomised(tiny("ct_augment", seed=3), seed=4)
    vol = ct_volume(z=2, n=64, seed=5)
    params = {"n": 2, "strength": 0.5, "steps": 2, "threshold_percentile": 0.0}

    def coarse(a: np.ndarray) -> torch.Tensor:
        sig = 2 * 1.4 / 0.7
        return lowpass(torch.from_numpy(np.asarray(a, np.float32))[:, None], (sig, sig))

    free = run_task("augment", vol, model=m, params=params, seed=2).outputs
    kept = run_task("augment", vol, model=m, params={**params, "keep_sigma_mm": 1.4}, seed=2)
    assert kept.provenance.parameters["keep_sigma_mm"] == 1.4
    err_free = max(float((coarse(o.data) - coarse(vol.data)).abs().mean()) for o in free)
    err_kept = max(float((coarse(o.data) - coarse(vol.data)).abs().mean()) for o in kept.outputs)
    assert err_kept < 0.2 * err_free, (err_kept, err_free)
    assert not np.array_equal(kept.outputs[0].data, kept.outputs[1].data)
    with pytest.raises(TaskInputError, match="keep_sigma_mm"):
        run_task("augment", vol, model=m, params={"keep_sigma_mm": -1.0}, seed=0)


def test_restoration_keep_sigma_regressor_keeps_the_received_low_pass() -> None:
    """keep_sigma_mm on a (residual) regressor: output = prediction + lp(received - prediction),
    exactly the one-shot ILVR step; 0 is the plain prediction; a model-config default applies."""
    from engine.nets import lowpass

    m = _randomised(tiny("ct_denoise", objective="regression", seed=2), seed=5)
    vol = ct_volume(z=3, n=48, seed=6)
    plain = run_task("ct_denoise", vol, model=m, params={}, seed=0)
    assert "keep_sigma_mm" not in plain.provenance.parameters
    off = run_task("ct_denoise", vol, model=m, params={"keep_sigma_mm": 0.0}, seed=0).outputs[0].data
    assert np.array_equal(off, plain.outputs[0].data)
    kept = run_task("ct_denoise", vol, model=m, params={"keep_sigma_mm": 1.4}, seed=0).outputs[0].data
    p = torch.from_numpy(plain.outputs[0].data)[:, None]
    want = p + lowpass(torch.from_numpy(vol.data)[:, None] - p, (2.0, 2.0))  # 1.4 mm / 0.7 mm
    np.testing.assert_allclose(kept, want[:, 0].numpy(), atol=0.02)
    # the coarse difference to the received image shrinks (a random net's residual is coarse junk)
    def coarse(a: np.ndarray) -> torch.Tensor:
        return lowpass(torch.from_numpy(np.asarray(a - vol.data, np.float32))[:, None], (4.0, 4.0))
    assert float(coarse(kept).abs().mean()) < 0.3 * float(coarse(plain.outputs[0].data).abs().mean())
    m.config["sampling"]["ct_denoise"] = {**m.config["sampling"]["ct_denoise"], "keep_sigma_mm": 1.4}
    r = run_task("ct_denoise", vol, model=m, params={}, seed=0)
    assert r.provenance.parameters["keep_sigma_mm"] == 1.4 and np.array_equal(r.outputs[0].data, kept)
    with pytest.raises(TaskInputError, match="keep_sigma_mm"):
        run_task("ct_denoise", vol, model=m, params={"keep_sigma_mm": -0.5}, seed=0)


def test_restoration_keep_sigma_diffusion_removes_a_coarse_residual() -> None:
    """A residual diffusion model that adds a constant 20 HU (pure low frequency): with
    keep_sigma_mm the received image's low-pass is kept at every step, so the offset goes."""
    m = tiny("ct_denoise")
    m.net = _ConstResidual(1.0)
    vol = ct_volume(z=2, n=32)
    params = {"threshold_percentile": 0.0, "strength": 0.3, "steps": 2}
    out = run_task("ct_denoise", vol, model=m, params=params, seed=3).outputs[0].data
    assert np.allclose(out - vol.data, 20.0, atol=0.05)
    kept = run_task("ct_denoise", vol, model=m, params={**params, "keep_sigma_mm": 2.0}, seed=3).outputs[0].data
    assert np.abs(kept - vol.data).max() < 1.0, np.abs(kept - vol.data).max()


def test_mr_denoise_accepts_keep_sigma() -> None:
    m = _randomised(tiny("mr_denoise", objective="regression"), seed=1)
    vol = mr_volume(z=2, n=32)
    a = run_task("mr_denoise", vol, model=m, params={}, seed=0).outputs[0].data
    b = run_task("mr_denoise", vol, model=m, params={"keep_sigma_mm": 2.0}, seed=0).outputs[0].data
    assert b.shape == vol.data.shape and not np.array_equal(a, b)

    def mean_shift(x: np.ndarray) -> float:  # per-slice mean moved away from the received one
        return float(np.abs(x.mean(axis=(1, 2)) - vol.data.mean(axis=(1, 2))).max())

    assert mean_shift(b) < 0.3 * mean_shift(a), (mean_shift(a), mean_shift(b))


def test_samples_is_the_mean_of_seeded_diffusion_samples() -> None:
    """``samples`` K: the mean of K posterior samples; sample 0 is the single-sample output of the
    same seed, sample j > 0 the output of seed SeedSequence([seed, j]); regressors refuse it."""
    m = _randomised(tiny("ct_denoise", seed=5), seed=5)
    vol = ct_volume(z=2, n=32, seed=6)
    params = {"strength": 0.6, "steps": 2}
    one = run_task("ct_denoise", vol, model=m, params=params, seed=7)
    assert np.array_equal(one.outputs[0].data,
                          run_task("ct_denoise", vol, model=m, params={**params, "samples": 1}, seed=7).outputs[0].data)
    two = run_task("ct_denoise", vol, model=m, params={**params, "samples": 2}, seed=7)
    s1 = int(np.random.SeedSequence([7, 1]).generate_state(1, dtype=np.uint32)[0])
    assert two.provenance.extra["sample_seeds"] == [7, s1] and two.provenance.parameters["samples"] == 2
    other = run_task("ct_denoise", vol, model=m, params=params, seed=s1).outputs[0].data
    assert not np.allclose(one.outputs[0].data, other, atol=1e-2)  # the two samples differ
    np.testing.assert_allclose(two.outputs[0].data, (one.outputs[0].data + other) / 2, atol=1e-3)
    # deterministic with the seed
    assert np.array_equal(two.outputs[0].data, run_task("ct_denoise", vol, model=m, params={**params, "samples": 2},
                                                        seed=7).outputs[0].data)
    with pytest.raises(TaskInputError, match="diffusion"):
        run_task("ct_denoise", vol, model=tiny("ct_denoise", objective="regression"), params={"samples": 2}, seed=0)
    with pytest.raises(TaskInputError, match="samples"):
        run_task("ct_denoise", vol, model=m, params={"samples": 9}, seed=0)


def test_samples_default_from_the_model_config_and_ct_to_mr() -> None:
    m = _randomised(tiny("ct_denoise", seed=1), seed=1)
    vol = ct_volume(z=2, n=32)
    m.config["sampling"]["ct_denoise"] = {**m.config["sampling"]["ct_denoise"], "samples": 2}
    r = run_task("ct_denoise", vol, model=m, params={}, seed=0)
    assert r.provenance.parameters["samples"] == 2 and len(r.provenance.extra["sample_seeds"]) == 2
    mr = _randomised(tiny("ct_to_mr", seed=2), seed=2)
    a = run_task("ct_to_mr", vol, model=mr, params={"target": "t2w", "steps": 2}, seed=4).outputs[0].data
    b = run_task("ct_to_mr", vol, model=mr, params={"target": "t2w", "steps": 2, "samples": 4}, seed=4)
    assert b.outputs[0].data.shape == a.shape and b.outputs[0].data.min() >= 0
    assert len(b.provenance.extra["sample_seeds"]) == 4 and not np.array_equal(a, b.outputs[0].data)


def test_sample_transforms_flips_runs_each_sample_in_its_frame() -> None:
    """``sample_transforms`` "flips": sample j runs on the slices in the j-th frame of identity /
    left-right flip / 180 degree rotation / both and its output is turned back; the mean is then
    the mean of those per-frame outputs (checked against running the flipped volume itself)."""
    m = _randomised(tiny("ct_denoise", seed=5), seed=5)
    vol = ct_volume(z=2, n=32, seed=6)
    vol.data[:, :, :6] += 300.0  # not symmetric: a flip changes the input
    params = {"strength": 0.6, "steps": 2, "keep_sigma_mm": 1.0}
    seeds = [7] + [int(np.random.SeedSequence([7, j]).generate_state(1, dtype=np.uint32)[0]) for j in (1, 2)]
    flips = run_task("ct_denoise", vol, model=m, params={**params, "samples": 3, "sample_transforms": "flips"}, seed=7)
    frames = [lambda a: a, lambda a: a[:, :, ::-1], lambda a: a[:, ::-1, ::-1]]  # identity, flip lr, rot 180
    expected = np.zeros_like(vol.data)
    for s, f in zip(seeds, frames, strict=True):
        turned = Volume(np.ascontiguousarray(f(vol.data)), vol.spacing, vol.intensity)
        expected += f(run_task("ct_denoise", turned, model=m, params=params, seed=s).outputs[0].data)  # f is its own inverse
    np.testing.assert_allclose(flips.outputs[0].data, expected / 3, atol=2e-3)
    plain = run_task("ct_denoise", vol, model=m, params={**params, "samples": 3}, seed=7)
    assert not np.allclose(plain.outputs[0].data, flips.outputs[0].data, atol=1e-2)
    assert flips.provenance.extra["sample_frames"] == [{"rot90": 0, "flip_lr": False}, {"rot90": 0, "flip_lr": True},
                                                       {"rot90": 2, "flip_lr": False}]
    assert "sample_frames" not in plain.provenance.extra
    with pytest.raises(TaskInputError, match="sample_transforms"):
        run_task("ct_denoise", vol, model=tiny("ct_denoise", objective="regression"),
                 params={"sample_transforms": "flips"}, seed=0)
    with pytest.raises(TaskInputError, match="one of"):
        run_task("ct_denoise", vol, model=m, params={"sample_transforms": "rotate"}, seed=0)
