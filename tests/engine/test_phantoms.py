"""Properties of the paired phantom generator (engine.research.phantoms)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from engine.research.phantoms import (
    MR_SCALE,
    SPLIT_BASE,
    SPLIT_SIZE,
    T1W_TE,
    T1W_TR,
    T2W_TE,
    T2W_TR,
    TISSUES,
    Tissue,
    iter_dataset,
    make_sample,
    rician,
    spin_echo,
    split_of,
    split_seed,
)


@pytest.fixture(scope="module")
def abdomen():
    return make_sample(11, size=128, n_slices=3, kind="abdomen", mr_snr=None, bias_strength=0.0)


@pytest.fixture(scope="module")
def head():
    return make_sample(12, size=128, n_slices=3, kind="head", mr_snr=None, bias_strength=0.0)


def _core(labels: np.ndarray, t: Tissue) -> np.ndarray:
    """Voxels of tissue t at least 2 pixels from any other tissue (no partial volume)."""
    m = labels == t
    return np.stack([ndimage.binary_erosion(s, iterations=2) for s in m])


def test_shapes_dtypes(abdomen):
    s = abdomen
    for a in (s.ct_hu, s.t1w, s.t2w):
        assert a.shape == (3, 128, 128) and a.dtype == np.float32
    assert s.labels.dtype == np.uint8 and s.lesion_mask.dtype == np.int16
    assert s.spacing[0] == 2.0 and s.spacing[1] == s.spacing[2] == pytest.approx(360 / 128)


def test_determinism_with_seed():
    a = make_sample(5, size=64, kind="abdomen")
    b = make_sample(5, size=64, kind="abdomen")
    c = make_sample(6, size=64, kind="abdomen")
    for name in ("ct_hu", "t1w", "t2w", "labels", "lesion_mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.labels, c.labels)


@pytest.mark.parametrize("fixture,tissues", [
    ("abdomen", [Tissue.AIR, Tissue.FAT, Tissue.MUSCLE, Tissue.BONE, Tissue.LIVER,
                 Tissue.VESSEL, Tissue.LESION, Tissue.SPLEEN]),
    ("head", [Tissue.AIR, Tissue.CSF, Tissue.GM, Tissue.WM, Tissue.BONE, Tissue.LESION]),
])
def test_label_statistics(fixture, tissues, request):
    s = request.getfixturevalue(fixture)
    present = set(np.unique(s.labels).tolist())
    assert {int(t) for t in tissues} <= present
    body = (s.labels != Tissue.AIR).mean()
    assert 0.25 < body < 0.95  # body fills a sensible part of the FOV
    if fixture == "abdomen":
        liver = (s.labels == Tissue.LIVER).sum() / (s.labels != Tissue.AIR).sum()
        assert 0.05 < liver < 0.5
    else:
        gm, wm = (s.labels == Tissue.GM).sum(), (s.labels == Tissue.WM).sum()
        assert 0.3 < gm / (gm + wm) < 0.8


@pytest.mark.parametrize("fixture", ["abdomen", "head"])
def test_hu_per_tissue(fixture, request):
    s = request.getfixturevalue(fixture)
    for t in np.unique(s.labels):
        t = Tissue(int(t))
        if t == Tissue.LESION:
            continue
        core = _core(s.labels, t)
        if core.sum() < 20:
            continue
        p = TISSUES[t]
        med = float(np.median(s.ct_hu[core]))
        assert abs(med - p.hu) <= max(10.0, 0.5 * p.hu_sd), (t, med)
    assert s.ct_hu.min() >= -1024 and s.ct_hu.max() <= 3071


@pytest.mark.parametrize("fixture", ["abdomen", "head"])
def test_pairs_aligned_mr_follows_spin_echo(fixture, request):
    """Same labels -> the MR of each tissue is the spin-echo signal of its PD/T1/T2."""
    s = request.getfixturevalue(fixture)
    checked = 0
    for t in np.unique(s.labels):
        t = Tissue(int(t))
        if t in (Tissue.LESION, Tissue.AIR, Tissue.GAS):
            continue
        core = _core(s.labels, t)
        if core.sum() < 20:
            continue
        p = TISSUES[t]
        for img, tr, te in ((s.t1w, T1W_TR, T1W_TE), (s.t2w, T2W_TR, T2W_TE)):
            want = float(spin_echo(p.pd, p.t1, p.t2, tr, te)) * MR_SCALE
            got = float(np.median(img[core]))
            assert got == pytest.approx(want, rel=0.08), (t, got, want)
        checked += 1
    assert checked >= 4
    # and lesions render with their own parameters in both modalities
    for les in s.lesions:
        m = _core(s.lesion_mask, les.index)  # type: ignore[arg-type]
        if m.sum() < 5:
            continue
        assert np.median(s.ct_hu[m]) == pytest.approx(les.hu, abs=10)
        want = float(spin_echo(les.pd, les.t1, les.t2, T2W_TR, T2W_TE)) * MR_SCALE
        assert np.median(s.t2w[m]) == pytest.approx(want, rel=0.1)


def test_contrast_ordering_matches_physics(head, abdomen):
    med = lambda s, img, t: float(np.median(img[_core(s.labels, t)]))  # noqa: E731
    assert med(head, head.t1w, Tissue.WM) > med(head, head.t1w, Tissue.GM) > \
        med(head, head.t1w, Tissue.CSF)
    assert med(head, head.t2w, Tissue.CSF) > med(head, head.t2w, Tissue.GM) > \
        med(head, head.t2w, Tissue.WM)
    assert med(abdomen, abdomen.t1w, Tissue.FAT) > med(abdomen, abdomen.t1w, Tissue.LIVER)


@pytest.mark.parametrize("fixture", ["abdomen", "head"])
def test_lesions(fixture, request):
    s = request.getfixturevalue(fixture)
    diam = [les.diameter_mm for les in s.lesions]
    assert any(d < 5 for d in diam) and any(d >= 5 for d in diam) and any(d >= 10 for d in diam)
    np.testing.assert_array_equal(s.lesion_mask > 0, s.labels == Tissue.LESION)
    for les in s.lesions:
        vox = int((s.lesion_mask == les.index).sum())
        assert vox > 0  # every recorded lesion is visible
        # lesions sit inside their organ: the ring around them is organ tissue or vessel
        m = s.lesion_mask == les.index
        ring = np.stack([ndimage.binary_dilation(sl, iterations=1) & ~sl for sl in m])
        organ = {"liver": {Tissue.LIVER, Tissue.VESSEL, Tissue.LESION},
                 "brain": {Tissue.GM, Tissue.WM, Tissue.LESION}}[les.organ]
        assert np.isin(s.labels[ring], [int(t) for t in organ]).mean() > 0.9


def test_slices_vary_smoothly_along_z(abdomen):
    lab = abdomen.labels
    agree = (lab[0] == lab[1]).mean()
    assert 0.85 < agree < 1.0


def test_bias_and_rician_noise():
    clean = make_sample(3, size=96, mr_snr=None, bias_strength=0.0)
    noisy = make_sample(3, size=96, mr_snr=20.0, bias_strength=0.2)
    np.testing.assert_array_equal(clean.labels, noisy.labels)
    air = clean.labels == Tissue.AIR
    body = ~air
    sigma = float(clean.t1w[body].mean()) / 20.0
    # background of a Rician image: Rayleigh with mean sigma * sqrt(pi / 2)
    assert noisy.t1w[air].mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.25)
    assert clean.t1w[_core(clean.labels, Tissue.AIR)].max() < 0.01 * clean.t1w[body].mean()
    ratio = noisy.t1w[body] / np.maximum(clean.t1w[body], 1e-3)
    assert ratio.std() > 0.02


def test_rician_magnitude_statistics():
    rng = np.random.default_rng(0)
    out = rician(np.zeros(200_000), 2.0, rng)
    assert out.mean() == pytest.approx(2.0 * np.sqrt(np.pi / 2), rel=0.02)


def test_splits_disjoint():
    seeds = {s: {split_seed(s, i) for i in range(50)} for s in SPLIT_BASE}
    assert not (seeds["train"] & seeds["val"]) and not (seeds["val"] & seeds["test"])
    assert not (seeds["train"] & seeds["test"])
    assert split_of(split_seed("val", 7)) == "val"
    assert split_of(split_seed("test", SPLIT_SIZE - 1)) == "test"
    with pytest.raises(ValueError):
        split_seed("train", SPLIT_SIZE)
    got = [s.seed for s in iter_dataset("test", 2, size=48, kind="mixed", start=4)]
    assert got == [SPLIT_BASE["test"] + 4, SPLIT_BASE["test"] + 5]


def test_invalid_arguments():
    with pytest.raises(ValueError):
        make_sample(0, kind="thorax")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        make_sample(-1)
