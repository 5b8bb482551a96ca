"""Quality gate: each check holds back what it should and passes a faithful output."""
from __future__ import annotations


import numpy as np
import pytest

from config.sections.pipeline import QualitySettings
from engine.api import Intensity, Volume
from node.pipeline.quality import QualityLimits, check
from tests.support.factory import phantom_hu


def _ct(data: np.ndarray) -> Volume:
    return Volume(data.astype(np.float32), (2.0, 1.0, 1.0), Intensity.HU)


def test_faithful_restoration_passes() -> None:
    src = _ct(phantom_hu(4, 64, 64, seed=1))
    out = _ct(phantom_hu(4, 64, 64, seed=1) * 0.98 + 2)
    rep = check(out, src)
    assert rep.passed, rep.reasons
    assert float(rep.stats["correlation"]) > 0.99


def test_nan_constant_range_bias_and_correlation_fail() -> None:
    src = _ct(phantom_hu(4, 64, 64))
    nan = phantom_hu(4, 64, 64)
    nan[1, 2, 3] = np.nan
    assert not check(_ct(nan), src).passed
    assert "non-finite" in check(_ct(nan), src).reasons[0]
    assert any("constant" in r for r in check(_ct(np.zeros((4, 64, 64))), src).reasons)
    one_flat = phantom_hu(4, 64, 64)
    one_flat[2] = 0
    assert any("constant slice" in r for r in check(_ct(one_flat)).reasons)
    hot = phantom_hu(4, 64, 64)
    hot[0, 0, 0] = 9000
    assert any("HU range" in r for r in check(_ct(hot)).reasons)
    shifted = _ct(phantom_hu(4, 64, 64) + 100)
    assert any("mean residual" in r for r in check(shifted, src).reasons)
    rng = np.random.default_rng(0)
    scrambled = _ct(rng.permutation(phantom_hu(4, 64, 64).ravel()).reshape(4, 64, 64))
    assert any("correlation" in r for r in check(scrambled, src).reasons)


def test_cross_modality_foreground_overlap() -> None:
    ct = phantom_hu(4, 64, 64)
    src = _ct(ct)
    mr = Volume(((ct + 1000) / 2000).astype(np.float32), (2.0, 1.0, 1.0), Intensity.MR_T2W)
    rep = check(mr, src)
    assert rep.passed, rep.reasons
    moved = Volume(np.roll(mr.data, 30, axis=2), mr.spacing, mr.intensity)
    assert any("Dice" in r for r in check(moved, src).reasons)


# -- per slice, range per intensity meaning, limits (issue 6) --------------------------------
def _abdomen(n: int = 8, size: int = 96) -> np.ndarray:
    from engine.research.phantoms import make_sample

    return make_sample(seed=3, size=size, n_slices=n, kind="abdomen", mr_snr=None,
                       bias_strength=0.0).ct_hu.astype(np.float32)


def test_faithful_restoration_reports_slice_statistics() -> None:
    ct = _abdomen()
    rng = np.random.default_rng(1)
    src, out = _ct(ct + rng.normal(0, 10, ct.shape)), _ct(ct)  # the ideal: noise removed
    rep = check(out, src)
    assert rep.passed, rep.reasons
    assert rep.checks == ()
    assert float(rep.stats["slice_correlation_min"]) > 0.99
    # the input's noise share is taken out: removing exactly the noise keeps the ratio ~1
    assert 0.95 < float(rep.stats["slice_edge_ratio_min"]) <= float(rep.stats["slice_edge_ratio_max"]) < 1.05
    assert rep.stats["slice_edge_ratio_judged"] == "8/8"
    assert abs(float(rep.stats["slice_residual_mean_max_abs"])) < 5


def test_slice_local_failures_are_not_averaged_away() -> None:
    from scipy import ndimage

    ct = _abdomen()
    src = _ct(ct)
    shifted = ct.copy()
    shifted[5] += 120.0  # volume mean residual 15 HU: under the volume limit (30)
    rep = check(_ct(shifted), src)
    assert "bias" not in rep.checks and rep.checks == ("slice_bias",), rep.reasons
    assert "1 slice(s) (5)" in rep.reasons[0] and rep.stats["slice_residual_mean_worst"] == "5"
    scrambled = ct.copy()
    scrambled[2] = np.random.default_rng(0).permutation(ct[2].ravel()).reshape(ct[2].shape)
    rep = check(_ct(scrambled), src)
    assert "correlation" not in rep.checks and "slice_correlation" in rep.checks, rep.reasons
    assert rep.stats["slice_correlation_worst"] == "2"
    blurred = ct.copy()
    blurred[6] = ndimage.gaussian_filter(ct[6], 4)  # one slice lost its edges
    rep = check(_ct(blurred), src)
    assert rep.checks == ("slice_edge_ratio",), rep.reasons
    assert "edges (contrast) lost" in rep.reasons[0] and "(6)" in rep.reasons[0]
    striped = ct.copy()  # +-300 HU bands 4 px wide in the soft tissue of one slice: structure
    soft = (ct[1] > -300) & (ct[1] < 200)  # the input lacks, no bias, no range violation
    bands = np.where((np.arange(ct.shape[2]) // 4) % 2 == 0, 300.0, -300.0)
    striped[1] += np.where(soft, bands[None, :], 0.0)
    rep = check(_ct(striped), src)
    assert rep.checks == ("slice_edge_ratio",), rep.reasons
    assert "edges the input lacks" in rep.reasons[0] and "(1)" in rep.reasons[0]


def test_slice_without_edges_is_not_judged_by_edge_ratio() -> None:
    """A slice whose body interior is flat (only noise: no contrast to keep) is not judged
    by the edge ratio; denoising it is no loss of contrast."""
    rng = np.random.default_rng(4)
    clean = np.full((3, 96, 96), -1000.0, dtype=np.float32)
    yy, xx = np.mgrid[0:96, 0:96]
    clean[:, np.hypot(yy - 48, xx - 48) < 40] = 40.0  # a uniform disc of soft tissue
    noisy = clean + rng.normal(0, 20, clean.shape).astype(np.float32)
    rep = check(_ct(clean), _ct(noisy))
    assert rep.passed, rep.reasons
    assert rep.stats["slice_edge_ratio_judged"] == "0/3" and "slice_edge_ratio_min" not in rep.stats


def test_flattened_soft_tissue_is_held() -> None:
    """The gap the volume statistics had: every soft tissue set to 40 HU keeps the volume
    correlation high (air vs body dominates) but loses the edges inside the body."""
    ct = _abdomen()
    flat = ct.copy()
    flat[(ct > -300) & (ct < 200)] = 40.0
    rep = check(_ct(flat), _ct(ct))
    assert float(rep.stats["correlation"]) > 0.8  # the volume check alone would pass it
    assert "slice_edge_ratio" in rep.checks, rep.reasons


def test_non_finite_reason_names_the_slices() -> None:
    ct = _abdomen()
    ct[3, 10, 10] = np.nan
    ct[7, 0, 0] = np.inf
    rep = check(_ct(ct))
    assert not rep.passed and rep.checks == ("non_finite",)
    assert "2 non-finite voxel(s) (NaN/inf) in 2 slice(s) (3, 7)" == rep.reasons[0]


def test_mr_magnitude_range() -> None:
    ct = _abdomen()
    mr = (ct + 1000.0) / 2.0  # >= 0 where the CT is >= -1000
    ok = Volume(np.maximum(mr, 0), (2.0, 1.0, 1.0), Intensity.MR_T2W)
    assert check(ok, _ct(ct)).passed
    undershoot = np.maximum(mr, 0).copy()
    undershoot[undershoot < 5] = -0.5 * np.percentile(mr, 99)  # background far below 0
    rep = check(Volume(undershoot, ok.spacing, Intensity.MR_T2W), _ct(ct))
    assert "mr_range" in rep.checks and "MR magnitude below 0" in rep.reasons[0]
    small = np.maximum(mr, 0).copy()
    small[0, 0, :4] = -1.0  # a little overshoot: tolerated by default, not with tolerance 0
    vol = Volume(small, ok.spacing, Intensity.MR_T2W)
    assert check(vol, _ct(ct)).passed
    assert "mr_range" in check(vol, _ct(ct), QualityLimits(mr_negative_tolerance=0.0)).checks
    # a CT output is judged in HU, not as MR
    assert check(_ct(ct), _ct(ct)).passed


def test_cross_modality_one_slice_moved() -> None:
    ct = _abdomen()
    mr = np.maximum((ct + 1000.0) / 2.0, 0).astype(np.float32)
    mr[4] = np.roll(mr[4], mr.shape[2] // 2, axis=1)  # anatomy of one slice moved
    rep = check(Volume(mr, (2.0, 1.0, 1.0), Intensity.MR_T2W), _ct(ct))
    assert "foreground_dice" not in rep.checks and "slice_foreground_dice" in rep.checks, rep.reasons
    assert rep.stats["slice_foreground_dice_worst"] == "4"


def test_limits_are_validated_and_named() -> None:
    with pytest.raises(ValueError, match="min_slice_correlation"):
        QualityLimits(min_slice_correlation=1.5)
    with pytest.raises(ValueError, match="hu_min"):
        QualityLimits(hu_min=100, hu_max=0)
    with pytest.raises(ValueError, match="min_slice_edge_ratio"):
        QualityLimits(min_slice_edge_ratio=2.0)
    assert QualityLimits.from_settings(QualitySettings()) == QualityLimits()
    lim = QualityLimits.from_settings(QualitySettings(min_slice_foreground_dice=0.9, mr_negative_tolerance=0))
    assert lim.min_slice_foreground_dice == 0.9 and lim.mr_negative_tolerance == 0.0


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("min_slice_correlation", 2, "pipeline.quality.min_slice_correlation"),
    ("max_slice_abs_bias_hu", -1, "pipeline.quality.max_slice_abs_bias_hu"),
    ("mr_negative_tolerance", 1.5, "pipeline.quality.mr_negative_tolerance"),
    ("min_slice_foreground_dice", -0.1, "pipeline.quality.min_slice_foreground_dice"),
    ("max_slice_edge_ratio", 0.5, "min_slice_edge_ratio"),
    ("hu_max", -2000, "hu_min"),
    ("min_slice_contrast", 0.5, "pipeline.quality.min_slice_contrast"),  # unknown key
])
def test_config_errors_name_the_key(tmp_path, key: str, value: float, needle: str) -> None:  # type: ignore[no-untyped-def]
    from config.settings import ConfigFileError, load_settings

    cfg = tmp_path / "node.toml"
    cfg.write_text(f'environment = "development"\ndata_dir = "{tmp_path}"\n'
                   f"[pipeline.quality]\n{key} = {value}\n")
    with pytest.raises(ConfigFileError) as exc:
        load_settings(cfg)
    assert needle in str(exc.value), str(exc.value)


def test_ct_to_mr_output_is_non_negative() -> None:
    """Engine output contract: ct_to_mr clamps the network's undershoot (an untrained tiny
    model undershoots 0 widely), so its MR passes the gate's magnitude range check."""
    from engine.api import run_task
    from tests.support.engine import tiny_model

    model = tiny_model("ct_to_mr")
    ct = _abdomen(n=2, size=32)
    out = run_task("ct_to_mr", _ct(ct), model=model, params={"target": "t2w", "steps": 1}, seed=0).outputs[0]
    assert out.intensity is Intensity.MR_T2W
    assert float(out.data.min()) >= 0.0
    assert "mr_range" not in check(out, _ct(ct), QualityLimits(mr_negative_tolerance=0.0)).checks


def test_mr_restoration_bias_allows_removing_the_rician_floor_but_not_a_shift() -> None:
    """A perfect MR denoiser (output = the noise-free image) at SNR 8 lowers the mean level:
    the received magnitude carries the Rician floor (background sigma sqrt(pi / 2), foreground
    E[M^2] = A^2 + 2 sigma^2). The gate takes that noise power out and passes it; a shifted
    output is still held. (Until 2026-12-03 the plain volume mean held the perfect output.)"""
    from engine.research.degrade import mr_noise
    from engine.research.phantoms import make_sample

    s = make_sample(seed=9, size=128, n_slices=3, kind="head", mr_snr=None, bias_strength=0.0)
    clean = s.t1w.astype(np.float32)
    noisy = mr_noise(clean, 8.0, seed=1).astype(np.float32)

    def mr(x: np.ndarray) -> Volume:
        return Volume(x.astype(np.float32), s.spacing, Intensity.MR_T1W)

    plain_mean = float((clean - noisy).mean()) / float(noisy.std())
    assert plain_mean < -0.1  # what the plain volume mean used to read: a "bias" beyond the limit
    rep = check(mr(clean), mr(noisy))
    assert "bias" not in rep.checks and "slice_bias" not in rep.checks, rep.reasons
    assert abs(float(rep.stats["residual_mean"])) < 0.03 * float(noisy.std())
    for shift in (+0.15, -0.15):
        held = check(mr(np.clip(clean + shift * noisy.std(), 0, None)), mr(noisy))
        assert "bias" in held.checks, (shift, held.reasons)
