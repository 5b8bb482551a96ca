"""Quality gate: each check holds back what it should and passes a faithful output."""
from __future__ import annotations

import numpy as np

from engine.api import Intensity, Volume
from node.quality import check
from tests.pipeline.factory import phantom_hu


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
