"""Low-dose CT and MR noise simulation (engine.research.degrade)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from engine.research.degrade import (
    estimate_rician_sigma,
    hu_to_mu,
    low_dose_ct,
    low_dose_noise,
    mr_noise,
)
from engine.research.phantoms import Tissue, make_sample


@pytest.fixture(scope="module")
def phantom():
    return make_sample(21, size=128, n_slices=2, kind="abdomen")


def _liver(s, k=0):
    return ndimage.binary_erosion(s.labels[k] == Tissue.LIVER, iterations=2)


def test_hu_to_mu():
    np.testing.assert_allclose(hu_to_mu(np.array([-1000.0, 0.0, 1000.0])) / hu_to_mu(0.0),
                               [0.0, 1.0, 2.0])


def test_noise_increases_as_dose_drops(phantom):
    noise = low_dose_noise(phantom.ct_hu[0], phantom.spacing[1], (1.0, 0.5, 0.25, 0.1), seed=3)
    liver = _liver(phantom)
    sd = [float(noise[d][liver].std()) for d in (1.0, 0.5, 0.25, 0.1)]
    assert sd[0] < sd[1] < sd[2] < sd[3]
    # quantum noise: SD ~ 1 / sqrt(dose) (electronic noise makes it slightly steeper)
    assert sd[3] / sd[0] == pytest.approx(np.sqrt(10), rel=0.3)
    # zero-mean noise: the HU of the tissue is preserved
    assert abs(float(noise[0.1][liver].mean())) < 0.5 * sd[3]


def test_low_dose_ct_deterministic_and_stackwise(phantom):
    a = low_dose_ct(phantom.ct_hu, phantom.spacing[1], 0.25, seed=9)
    b = low_dose_ct(phantom.ct_hu, phantom.spacing[1], 0.25, seed=9)
    c = low_dose_ct(phantom.ct_hu, phantom.spacing[1], 0.25, seed=10)
    assert a.shape == phantom.ct_hu.shape and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0] - phantom.ct_hu[0], a[1] - phantom.ct_hu[1])
    many = low_dose_ct(phantom.ct_hu[0], phantom.spacing[1], (0.5, 0.25), seed=9)
    assert set(many) == {0.5, 0.25} and many[0.25].shape == phantom.ct_hu.shape[1:]
    # a dose level's noise does not depend on which other doses were requested
    np.testing.assert_array_equal(many[0.25], a[0])


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        low_dose_noise(np.zeros((8, 10)), 1.0, (0.5,), seed=0)
    with pytest.raises(ValueError):
        low_dose_noise(np.zeros((8, 8)), 1.0, (1.5,), seed=0)
    with pytest.raises(ValueError):
        mr_noise(np.ones((8, 8)), 0.0, seed=0)


@pytest.mark.parametrize("snr", [5.0, 20.0])
def test_mr_noise_hits_requested_snr(snr):
    s = make_sample(22, size=96, mr_snr=None, bias_strength=0.0)
    body = s.labels[0] != Tissue.AIR
    air = ndimage.binary_erosion(s.labels[0] == Tissue.AIR, iterations=3)
    noisy = mr_noise(s.t1w[0], snr, seed=1, mask=body)
    sigma = estimate_rician_sigma(noisy, air)
    assert float(s.t1w[0][body].mean()) / sigma == pytest.approx(snr, rel=0.1)
    np.testing.assert_array_equal(noisy, mr_noise(s.t1w[0], snr, seed=1, mask=body))


def test_sparse_view_ct_streaks_grow_with_fewer_views():
    """Reference + streaks of FBP from 60 / 90 of 720 views: zero outside the circle, the
    fewer views the stronger the streaks, 720 of 720 adds nothing."""
    from engine.research.degrade import sparse_view_ct, sparse_view_streaks

    s = make_sample(7, size=128)
    hu = s.ct_hu[0]
    assert np.abs(sparse_view_streaks(hu, 720)).max() < 1e-3
    e60 = sparse_view_ct(hu, 60) - hu
    e90 = sparse_view_ct(hu, 90) - hu
    inside = hu > -900
    assert e60[inside].std() > e90[inside].std() > 5.0  # HU
    assert abs(float(e60[inside].mean())) < 0.2 * float(e60[inside].std())  # streaks, no bias
    assert np.array_equal(sparse_view_ct(s.ct_hu, 60)[0], sparse_view_ct(hu, 60))
    with pytest.raises(ValueError):
        sparse_view_streaks(hu, 7)


def test_mr_undersample_cartesian_mask_and_zero_filling():
    from engine.research.degrade import cartesian_mask, mr_undersample

    m4, m8 = cartesian_mask(256, 4, seed=1), cartesian_mask(256, 8, seed=1)
    assert m4.sum() == 64 and m8.sum() == 32
    assert m4[128 - 10:128 + 10].all() and m8[128 - 5:128 + 5].all()  # fully sampled centre
    assert np.array_equal(m4, cartesian_mask(256, 4, seed=1))
    assert not np.array_equal(m4, cartesian_mask(256, 4, seed=2))
    img = make_sample(3, size=128).t2w[0]
    full = mr_undersample(img, 1, seed=0)
    np.testing.assert_allclose(full, img, atol=1e-3 * float(img.max()))
    e4 = np.abs(mr_undersample(img, 4, seed=0) - img).mean()
    e8 = np.abs(mr_undersample(img, 8, seed=0) - img).mean()
    assert 0 < e4 < e8
    # the input's value scale: the DC line is sampled, so the mean stays close (the magnitude
    # of the aliased complex image adds a little: |a + b| >= |a|)
    assert img.mean() <= mr_undersample(img, 8, seed=0).mean() <= 1.15 * img.mean()
