"""Classical baselines (engine.research.baselines)."""
from __future__ import annotations

import numpy as np
import pytest

from engine.api import Intensity, Volume
from engine.research.baselines import HuLut, NLMDenoiser, estimate_sigma
from engine.research.degrade import FULL_DOSE_I0, low_dose_ct, mr_noise
from engine.research.metrics import CT_RANGE, mr_range, psnr
from engine.research.phantoms import iter_dataset, make_sample


def test_estimate_sigma_white_noise():
    rng = np.random.default_rng(0)
    img = 100.0 + rng.normal(0, 7.0, (128, 128))
    assert estimate_sigma(img) == pytest.approx(7.0, rel=0.1)


def test_nlm_improves_low_dose_ct_and_mr():
    s = make_sample(1_000_000_050, size=128, kind="abdomen", mr_snr=None, bias_strength=0.0)
    # 2.8 mm pixels carry little noise at clinical photon counts: lower the budget 20x
    ld = low_dose_ct(s.ct_hu, s.spacing[1], 0.1, seed=1, i0=FULL_DOSE_I0 / 20)
    out = NLMDenoiser(1.2)(Volume(ld, s.spacing, Intensity.HU))
    assert out.data.shape == ld.shape and out.intensity == Intensity.HU
    assert psnr(s.ct_hu, out.data, CT_RANGE) > psnr(s.ct_hu, ld, CT_RANGE) + 1.0
    noisy = mr_noise(s.t1w, 10.0, seed=2)
    rg = mr_range(s.t1w)
    outm = NLMDenoiser(0.7)(Volume(noisy.astype(np.float32), s.spacing, Intensity.MR_T1W))
    assert psnr(s.t1w, outm.data, rg) > psnr(s.t1w, noisy, rg) + 1.0


def test_hu_lut_fit_recovers_a_known_map_and_round_trips():
    rng = np.random.default_rng(3)
    ct = rng.uniform(-200, 250, (1, 64, 64))
    mr = 2.0 * ct + 500.0  # a known monotone map
    lut = HuLut.fit([(ct, mr)], Intensity.MR_T1W, smooth_px=0.0)
    out = lut(Volume(ct.astype(np.float32), (1.0, 1.0, 1.0), Intensity.HU))
    assert out.intensity == Intensity.MR_T1W
    np.testing.assert_allclose(out.data, mr, atol=6.0)
    again = HuLut.from_json(lut.to_json())
    assert again == lut
    with pytest.raises(ValueError):
        lut(Volume(mr.astype(np.float32), (1.0, 1.0, 1.0), Intensity.MR))


def test_hu_lut_on_phantoms_beats_constant():
    train = [(s.ct_hu, s.t2w) for s in iter_dataset("train", 3, size=96, kind="abdomen",
                                                     mr_snr=None, bias_strength=0.0)]
    lut = HuLut.fit(train, Intensity.MR_T2W)
    s = next(iter_dataset("test", 1, size=96, kind="abdomen", mr_snr=None, bias_strength=0.0))
    out = lut(Volume(s.ct_hu, s.spacing, Intensity.HU)).data
    rg = mr_range(s.t2w)
    assert psnr(s.t2w, out, rg) > psnr(s.t2w, np.full_like(out, s.t2w.mean()), rg) + 3.0
