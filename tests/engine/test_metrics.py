"""Known answers for engine.research.metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest

from engine.research.metrics import (
    CT_RANGE,
    CT_WINDOW,
    false_lesions,
    flat_mask_from_labels,
    flat_mask_from_reference,
    lesion_scores,
    mae,
    noise_sd,
    psnr,
    roi_ssim,
    ssim,
    summarize_lesions,
)


def _disc_image(size=96, lesions=((30, 30, 8), (60, 64, 3), (70, 25, 1.5))):
    yy, xx = np.mgrid[:size, :size]
    ref = np.full((size, size), 100.0)
    mask = np.zeros((size, size), np.int16)
    for i, (cy, cx, r) in enumerate(lesions, start=1):
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        ref[m] = 40.0
        mask[m] = i
    return ref[None], mask[None]


def test_psnr_known_perturbation():
    ref = np.zeros((2, 16, 16))
    assert psnr(ref, ref + 20.0, CT_RANGE) == pytest.approx(10 * math.log10(2000**2 / 400))
    assert psnr(ref, ref, CT_RANGE) == math.inf
    half = ref.copy()
    half[:, :8] += 10.0  # MSE = 50
    assert psnr(ref, half, (0.0, 100.0)) == pytest.approx(10 * math.log10(100**2 / 50))


def test_ssim_identity_and_degradation():
    rng = np.random.default_rng(0)
    ref, _ = _disc_image()
    assert ssim(ref, ref, CT_WINDOW) == pytest.approx(1.0)
    s10 = ssim(ref, ref + rng.normal(0, 10, ref.shape), CT_WINDOW)
    s40 = ssim(ref, ref + rng.normal(0, 40, ref.shape), CT_WINDOW)
    assert 1.0 > s10 > s40 > 0.0
    rois = roi_ssim(ref, ref, CT_WINDOW, {"all": np.ones_like(ref, bool),
                                          "none": np.zeros_like(ref, bool)})
    assert rois == {"all": pytest.approx(1.0)}


def test_mae_and_noise_sd():
    rng = np.random.default_rng(1)
    ref, _ = _disc_image()
    assert mae(ref, ref + 7.0) == pytest.approx(7.0)
    noisy = ref + rng.normal(0, 10, ref.shape)
    flat = flat_mask_from_reference(ref)
    assert flat.sum() > 1000 and not flat[0, 30, 38]  # the lesion edge is not flat
    assert noise_sd(ref, noisy, flat) == pytest.approx(10.0, rel=0.05)
    labels = np.zeros((1, 20, 20), np.uint8)
    labels[0, 5:15, 5:15] = 4
    assert flat_mask_from_labels(labels, (4,), erosion=2).sum() == 36


def test_lesion_contrast_and_dice():
    ref, mask = _disc_image()
    spacing = (1.0, 1.0, 1.0)
    own = {s.index: s for s in lesion_scores(ref, ref, mask, spacing)}
    assert own[1].dice > 0.9 and own[1].contrast_ratio == pytest.approx(1.0)
    assert own[1].diameter_mm == pytest.approx(16.0, rel=0.1)
    # halve every lesion's contrast: ratio 0.5, segmentation at the midpoint fails
    halved = np.where(mask > 0, 70.0 + 0.0 * ref, ref)
    h = {s.index: s for s in lesion_scores(ref, halved, mask, spacing)}
    assert h[1].contrast_ratio == pytest.approx(0.5, abs=0.02)
    # erase the lesions: contrast 0, Dice 0
    erased = {s.index: s for s in lesion_scores(ref, np.full_like(ref, 100.0), mask, spacing)}
    assert erased[1].dice == 0.0 and erased[1].contrast_ratio == pytest.approx(0.0)
    summ = summarize_lesions(list(own.values()))
    assert summ["lesions"] == 3 and summ["dice_ge5mm"] > 0.9
    assert summ["contrast_within_10pct"] == 1.0


def test_lesion_summary_visible_split_and_contrast_error():
    """A lesion of 1 HU reference contrast gets a meaningless ratio from 1 HU of error; the
    *_visible keys leave it out, the contrast error (HU) counts it at its true size."""
    from engine.research.metrics import LesionScore

    scores = [LesionScore(1, 8.0, -40.0, -38.0, 0.9),   # >= 5 mm, ratio 0.95: within 10 %
              LesionScore(2, 3.0, -30.0, -21.0, 0.5),   # < 5 mm, ratio 0.70
              LesionScore(3, 9.0, 1.0, 0.0, 0.0)]       # 1 HU "lesion": ratio 0, error 1 HU
    plain = summarize_lesions(scores)
    assert plain["contrast_within_10pct"] == pytest.approx(1 / 3)
    assert plain["contrast_error"] == pytest.approx((2 + 9 + 1) / 3)
    assert "contrast_within_10pct_visible" not in plain
    vis = summarize_lesions(scores, visible_contrast=10.0)
    assert vis["n_visible"] == 2
    assert vis["contrast_within_10pct_visible"] == pytest.approx(0.5)
    assert vis["contrast_within_10pct_ge5mm_visible"] == 1.0
    assert vis["contrast_within_10pct_lt5mm_visible"] == 0.0
    assert vis["contrast_ratio_visible"] == pytest.approx((0.95 + 0.7) / 2)


def test_false_lesions_counts_drawn_blobs_not_edges_or_noise():
    ref, mask = _disc_image()  # lesions darker than background by 60
    spacing = (1.0, 1.0, 1.0)
    assert false_lesions(ref, ref, mask, spacing) == 0.0
    yy, xx = np.mgrid[:96, :96]
    drawn = ref.copy()
    drawn[0][(yy - 75) ** 2 + (xx - 75) ** 2 <= 4 ** 2] = 40.0   # 8 mm: a false lesion
    drawn[0][(yy - 15) ** 2 + (xx - 75) ** 2 <= 1.5 ** 2] = 40.0  # 3 mm: below 5 mm
    drawn[0][(yy - 45) ** 2 + (xx - 80) ** 2 <= 4 ** 2] = 160.0   # brighter: not lesion-like
    drawn[0][5:90, 90:92] = 40.0                                  # a 2 px strip (edge shift)
    assert false_lesions(ref, drawn, mask, spacing) == 1.0
    # a faint blob (a quarter of the lesion contrast) is not a lesion
    faint = ref.copy()
    faint[0][(yy - 75) ** 2 + (xx - 75) ** 2 <= 4 ** 2] = 85.0
    assert false_lesions(ref, faint, mask, spacing) == 0.0
    # outside the region, or over a true lesion: not counted; per slice over two slices
    assert false_lesions(ref, drawn, mask, spacing, region=xx[None] < 60) == 0.0
    two = np.concatenate([ref, ref]), np.concatenate([drawn, ref]), np.concatenate([mask, mask])
    assert false_lesions(two[0], two[1], two[2], spacing) == 0.5
    grown = ref.copy()
    grown[0][(yy - 30) ** 2 + (xx - 30) ** 2 <= 12 ** 2] = 40.0  # a true lesion drawn larger
    assert false_lesions(ref, grown, mask, spacing) == 0.0
    # white noise of a quarter of the lesion contrast makes no 5 mm blobs after smoothing
    rng = np.random.default_rng(3)
    assert false_lesions(ref, ref + rng.normal(0, 15, ref.shape), mask, spacing) == 0.0
    assert math.isnan(false_lesions(ref, drawn, np.zeros_like(mask), spacing))
    # a bright patch of the reference's texture that the output flattens: the output departs
    # from the reference there but draws nothing that stands out; not a lesion
    textured = ref.copy()
    textured[0][(yy - 75) ** 2 + (xx - 75) ** 2 <= 4 ** 2] = 160.0
    assert false_lesions(textured, ref, mask, spacing) == 0.0
    assert false_lesions(textured, drawn, mask, spacing) == 1.0
    # lesions fainter than min_contrast do not set the threshold (none left: NaN)
    assert false_lesions(ref, drawn, mask, spacing, min_contrast=59.0) == 1.0
    assert math.isnan(false_lesions(ref, drawn, mask, spacing, min_contrast=61.0))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        psnr(np.zeros((4, 4)), np.zeros((5, 4)), CT_RANGE)


def test_lesion_kept_relative_to_the_input():
    """A lesion is kept when the output keeps >= 90 % of the contrast it has in the input,
    whatever the reference contrast; a lesion the input does not show is not counted."""
    from engine.research.metrics import kept_vs_input

    ref, mask = _disc_image()  # lesions 60 darker than the background
    sp = (1.0, 1.0, 1.0)
    inp = np.where(mask > 0, 60.0, ref)  # the received image shows 40 of the 60
    inp_scores = lesion_scores(ref, inp, mask, sp)
    same = kept_vs_input(lesion_scores(ref, inp, mask, sp), inp_scores)
    assert same["kept_vs_input"] == 1.0 and same["contrast_ratio_to_input"] == pytest.approx(1.0)
    assert same["n_kept_eval"] == 3
    # output keeps 36 of the 40 (90 %): kept, though only 60 % of the reference contrast
    kept = kept_vs_input(lesion_scores(ref, np.where(mask > 0, 64.0, ref), mask, sp), inp_scores)
    assert kept["kept_vs_input"] == 1.0
    assert kept["contrast_ratio_to_input"] == pytest.approx(0.9, abs=0.01)
    # 30 of 40 (75 %): faded
    faded = kept_vs_input(lesion_scores(ref, np.where(mask > 0, 70.0, ref), mask, sp), inp_scores)
    assert faded["kept_vs_input"] == 0.0
    assert faded["contrast_ratio_to_input"] == pytest.approx(0.75, abs=0.01)
    # input without the lesions: nothing to keep; min_ref_contrast filters too
    flat_in = lesion_scores(ref, np.full_like(ref, 100.0), mask, sp)
    assert kept_vs_input(lesion_scores(ref, inp, mask, sp), flat_in)["n_kept_eval"] == 0
    assert kept_vs_input(lesion_scores(ref, inp, mask, sp), inp_scores,
                         min_ref_contrast=100.0)["n_kept_eval"] == 0
