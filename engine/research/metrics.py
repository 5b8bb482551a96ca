"""Image-quality metrics for restoration and synthesis, on arrays (z, y, x) or (y, x).

Conventions (stated in every report):

* CT: PSNR over the HU range ``CT_RANGE`` (-1000 .. 1000 HU, data range 2000) after clipping
  to it; SSIM on the soft-tissue window ``CT_WINDOW`` (-160 .. 240 HU) after clipping, data
  range 400 (Wang et al., IEEE TIP 13:600, 2004, Gaussian window sigma 1.5, K1 0.01, K2 0.03
  as in skimage); MAE in HU over the body (or the whole image).
* MR: intensities are arbitrary units, so PSNR / SSIM use the data range ``[0, p99.9 of the
  reference]`` after clipping both images to it.
* SSIM of a stack is the mean of 2-D slice SSIMs (the slices are anisotropic).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

log = logging.getLogger(__name__)

CT_RANGE = (-1000.0, 1000.0)
CT_WINDOW = (-160.0, 240.0)


def _stack(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 2:
        return a[None]
    if a.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D array, got shape {a.shape}")
    return a


def _check(ref: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r, o = _stack(ref), _stack(out)
    if r.shape != o.shape:
        raise ValueError(f"shape mismatch: reference {r.shape} vs output {o.shape}")
    return r, o


def mr_range(ref: np.ndarray) -> tuple[float, float]:
    """Data range used for MR: 0 .. 99.9th percentile of the reference."""
    return 0.0, float(np.percentile(ref, 99.9))


def psnr(ref: np.ndarray, out: np.ndarray, value_range: tuple[float, float],
         mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(range^2 / MSE), both clipped to the range."""
    r, o = _check(ref, out)
    lo, hi = value_range
    r, o = np.clip(r, lo, hi), np.clip(o, lo, hi)
    err = (r - o) ** 2
    mse = float(err[_stack(mask).astype(bool)].mean() if mask is not None else err.mean())
    if mse == 0:
        return math.inf
    return 10.0 * math.log10((hi - lo) ** 2 / mse)


def ssim_map(ref: np.ndarray, out: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Per-pixel SSIM (z, y, x) computed slice by slice on images clipped to the range."""
    r, o = _check(ref, out)
    lo, hi = value_range
    r, o = np.clip(r, lo, hi), np.clip(o, lo, hi)
    maps = []
    for k in range(r.shape[0]):
        _, m = structural_similarity(r[k], o[k], data_range=hi - lo, gaussian_weights=True,
                                     sigma=1.5, use_sample_covariance=False, full=True)
        maps.append(m)
    return np.stack(maps)


def ssim(ref: np.ndarray, out: np.ndarray, value_range: tuple[float, float],
         mask: np.ndarray | None = None) -> float:
    """Mean SSIM (over the mask if given)."""
    m = ssim_map(ref, out, value_range)
    return float(m[_stack(mask).astype(bool)].mean() if mask is not None else m.mean())


def roi_ssim(ref: np.ndarray, out: np.ndarray, value_range: tuple[float, float],
             rois: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean SSIM inside each named region (empty regions are left out)."""
    m = ssim_map(ref, out, value_range)
    res: dict[str, float] = {}
    for name, roi in rois.items():
        sel = _stack(roi).astype(bool)
        if sel.any():
            res[name] = float(m[sel].mean())
    return res


def mae(ref: np.ndarray, out: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute error (HU for CT)."""
    r, o = _check(ref, out)
    e = np.abs(r - o)
    return float(e[_stack(mask).astype(bool)].mean() if mask is not None else e.mean())


def flat_mask_from_reference(ref: np.ndarray, hu_range: tuple[float, float] = (-150.0, 250.0),
                             max_gradient: float = 5.0, erosion: int = 3) -> np.ndarray:
    """Flat soft-tissue regions of a reference CT: HU in range and a small local gradient.

    Used when no label map exists (real slices). ``max_gradient`` is in HU per pixel of the
    Gaussian-smoothed (sigma 2 px) reference.
    """
    r = _stack(ref)
    out = np.zeros(r.shape, dtype=bool)
    for k in range(r.shape[0]):
        sm = ndimage.gaussian_filter(r[k], 2.0)
        grad = np.hypot(*np.gradient(sm))
        m = (sm > hu_range[0]) & (sm < hu_range[1]) & (grad < max_gradient)
        out[k] = ndimage.binary_erosion(m, iterations=erosion)
    return out


def flat_mask_from_labels(labels: np.ndarray, tissues: tuple[int, ...],
                          erosion: int = 3) -> np.ndarray:
    """Interior (eroded by ``erosion`` px in plane) of the given tissue labels."""
    lab = _stack(labels).astype(np.int64)
    m = np.isin(lab, tissues)
    return np.stack([ndimage.binary_erosion(s, iterations=erosion) for s in m])


def noise_sd(ref: np.ndarray, out: np.ndarray, flat: np.ndarray) -> float:
    """SD of the residual ``out - ref`` inside flat regions (remaining noise, HU for CT)."""
    r, o = _check(ref, out)
    sel = _stack(flat).astype(bool)
    if not sel.any():
        return math.nan
    return float((o - r)[sel].std())


@dataclass(frozen=True)
class LesionScore:
    """Per-lesion result. Diameter is the equivalent diameter of its largest cross-section."""

    index: int
    diameter_mm: float
    contrast_ref: float
    contrast_out: float
    dice: float

    @property
    def contrast_ratio(self) -> float:
        return self.contrast_out / self.contrast_ref if self.contrast_ref else math.nan


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks; NaN when both are empty."""
    den = float(a.sum() + b.sum())
    return 2.0 * float((a & b).sum()) / den if den else math.nan


def _ring(mask: np.ndarray, inner: int, outer: int) -> np.ndarray:
    """Pixels between ``inner`` and ``outer`` px from the mask, in plane, slice by slice."""
    res = np.zeros_like(mask)
    for k in range(mask.shape[0]):
        if mask[k].any():
            d = ndimage.distance_transform_edt(~mask[k])
            res[k] = (d > inner) & (d <= outer)
    return res


def lesion_scores(ref: np.ndarray, out: np.ndarray, lesion_mask: np.ndarray,
                  spacing: tuple[float, float, float],
                  exclude: np.ndarray | None = None) -> list[LesionScore]:
    """Contrast and threshold-segmentation Dice for every lesion in ``lesion_mask``.

    Contrast = mean inside the lesion (eroded by 1 px when it is wide enough) minus the mean
    of a background ring 2-5 px around it (other lesions and ``exclude`` left out: e.g.
    vessels). Segmentation: the output is smoothed (Gaussian, 0.75 px) and thresholded at the
    midpoint between the *reference's* lesion and background means, inside the lesion grown by
    max(2 px, radius / 2); connected components touching the lesion are kept; Dice against the
    lesion's mask.
    """
    r, o = _check(ref, out)
    lm = _stack(lesion_mask).astype(np.int64)
    excl = _stack(exclude).astype(bool) if exclude is not None else np.zeros(lm.shape, bool)
    px_area = spacing[1] * spacing[2]
    o_s = np.stack([ndimage.gaussian_filter(s, 0.75) for s in o])
    scores: list[LesionScore] = []
    for idx in [int(v) for v in np.unique(lm) if v > 0]:
        m = lm == idx
        area = int(m.sum(axis=(1, 2)).max())
        diam = 2.0 * math.sqrt(area * px_area / math.pi)
        core = np.stack([ndimage.binary_erosion(s) if s.sum() > 20 else s for s in m])
        ring = _ring(m, 2, 5) & (lm == 0) & ~excl
        if not ring.any() or not core.any():
            continue
        bg_ref, le_ref = float(r[ring].mean()), float(r[core].mean())
        bg_out, le_out = float(o[ring].mean()), float(o[core].mean())
        thr = 0.5 * (bg_ref + le_ref)
        margin = max(2, math.ceil(0.5 * diam / 2 / spacing[1]))
        zz, yy, xx = np.nonzero(m)
        box = (slice(zz.min(), zz.max() + 1),
               slice(max(yy.min() - margin - 1, 0), yy.max() + margin + 2),
               slice(max(xx.min() - margin - 1, 0), xx.max() + margin + 2))
        mb = m[box]
        roi = np.stack([ndimage.binary_dilation(sl, iterations=margin) for sl in mb])
        seg = (o_s[box] < thr) if le_ref < bg_ref else (o_s[box] > thr)
        seg &= roi & ((lm[box] == 0) | mb)  # neighbouring lesions do not count against it
        comp, _ = ndimage.label(seg)
        keep = np.unique(comp[seg & mb])
        seg = np.isin(comp, keep[keep > 0])
        inter = float((seg & mb).sum())
        dice = 2 * inter / float(seg.sum() + mb.sum())
        scores.append(LesionScore(idx, diam, le_ref - bg_ref, le_out - bg_out, dice))
    return scores


def false_lesion_map(ref: np.ndarray, out: np.ndarray, lesion_mask: np.ndarray,
                     spacing: tuple[float, float, float], region: np.ndarray | None = None,
                     exclude: np.ndarray | None = None, min_diameter_mm: float = 5.0,
                     min_contrast: float = 0.0) -> np.ndarray | None:
    """Lesion-like blobs the output has and the reference does not: ``(z, y, x)`` labels.

    The counterpart of lesion Dice: a model that draws every true lesion can still draw
    lesions that are not there. For each lesion polarity present in ``lesion_mask``
    (brighter or darker than its ring, as in :func:`lesion_scores`), the threshold is half
    the median reference contrast of those lesions (the same midpoint rule as the Dice
    segmentation); lesions whose reference contrast is below ``min_contrast`` do not count
    there (a CT lesion of 2 HU would set a threshold that grey / white matter texture crosses;
    the CT evaluation passes 10 HU, below the grey / white matter contrast). A false lesion is
    a connected in-plane region where the smoothed output (Gaussian 0.75 px) exceeds the
    smoothed reference by more than that threshold in the lesions' direction, that

    - survives an opening with a disc of half ``min_diameter_mm`` (at least the 3 x 3 px
      cross; a tissue edge drawn a pixel or two off is a thin strip and does not; a round
      blob does),
    - covers at least the area of a disc of ``min_diameter_mm``,
    - lies inside ``region`` (e.g. the body) and touches neither a reference lesion grown
      by 2 px nor ``exclude`` (e.g. vessels),
    - stands out in the output itself: its smoothed mean differs from that of a ring 2-4 px
      around it by more than the threshold, in the lesions' direction (a restoration that
      flattens the reference's texture departs from the reference in lesion-sized patches,
      but draws nothing there).

    Blobs are numbered 1.. per slice (in-plane components); None without lesions (of at least
    ``min_contrast``) to set the threshold.
    """
    r, o = _check(ref, out)
    lm = _stack(lesion_mask).astype(np.int64)
    reg = _stack(region).astype(bool) if region is not None else np.ones(lm.shape, bool)
    excl = _stack(exclude).astype(bool) if exclude is not None else np.zeros(lm.shape, bool)
    contrasts = [s.contrast_ref for s in lesion_scores(r, r, lm, spacing, exclude=excl)
                 if s.contrast_ref != 0 and abs(s.contrast_ref) >= min_contrast]
    if not contrasts:
        return None
    near = np.stack([ndimage.binary_dilation(sl, iterations=2) for sl in lm > 0]) | excl
    o_s = np.stack([ndimage.gaussian_filter(a, 0.75) for a in o])
    d = o_s - np.stack([ndimage.gaussian_filter(b, 0.75) for b in r])
    rad = max(1.0, 0.25 * min_diameter_mm / spacing[1])  # at least the 3 x 3 cross
    yy, xx = np.mgrid[-math.ceil(rad):math.ceil(rad) + 1, -math.ceil(rad):math.ceil(rad) + 1]
    disc = yy ** 2 + xx ** 2 <= rad ** 2
    min_area = math.pi * (0.5 * min_diameter_mm) ** 2 / (spacing[1] * spacing[2])
    res = np.zeros(lm.shape, np.int32)
    for sign in (1.0, -1.0):
        same = [abs(c) for c in contrasts if c * sign > 0]
        if not same:
            continue
        thr = 0.5 * float(np.median(same))
        for k in range(lm.shape[0]):
            cand = ndimage.binary_opening((sign * d[k] > thr) & reg[k], structure=disc)
            comp, n = ndimage.label(cand)
            if n == 0:
                continue
            areas = ndimage.sum_labels(cand, comp, index=np.arange(1, n + 1))
            touching = set(np.unique(comp[near[k] & cand]).tolist())
            for i, area in enumerate(areas, start=1):
                if area < min_area or i in touching:
                    continue
                blob = comp == i
                ring = (ndimage.binary_dilation(blob, iterations=4)
                        & ~ndimage.binary_dilation(blob, iterations=1) & reg[k] & ~near[k])
                if ring.any() and sign * (o_s[k][blob].mean() - o_s[k][ring].mean()) > thr:
                    res[k][blob] = res[k].max() + 1
    return res


def false_lesions(ref: np.ndarray, out: np.ndarray, lesion_mask: np.ndarray,
                  spacing: tuple[float, float, float], region: np.ndarray | None = None,
                  exclude: np.ndarray | None = None, min_diameter_mm: float = 5.0,
                  min_contrast: float = 0.0) -> float:
    """False lesions per slice (:func:`false_lesion_map`); NaN without reference lesions."""
    m = false_lesion_map(
        ref, out, lesion_mask, spacing, region, exclude, min_diameter_mm, min_contrast
    )
    if m is None:
        return math.nan
    return float(sum(int(sl.max()) for sl in m)) / m.shape[0]


#: a lesion is "kept" when the output keeps at least this share of its contrast in the input
KEEP_OF_INPUT = 0.9


def kept_vs_input(out_scores: list[LesionScore], in_scores: list[LesionScore],
                  min_ref_contrast: float = 0.0, keep: float = KEEP_OF_INPUT) -> dict[str, float]:
    """Lesion contrast read relative to the received image.

    ``out_scores`` = :func:`lesion_scores` (reference, output), ``in_scores`` = (reference,
    input), same lesion mask. A lesion counts as kept when its contrast in the output is at
    least ``keep`` x its contrast in the input (the restoration must not fade what it received;
    an output that sharpens a lesion beyond the input counts as kept). Only lesions whose
    reference contrast is at least ``min_ref_contrast`` (CT: 10 HU) and whose input contrast has
    the reference's sign (the input shows the lesion) count; ``n_kept_eval`` says how many.

    Returns ``kept_vs_input`` (share of those kept) and ``contrast_ratio_to_input`` (mean
    output / input contrast over them).
    """
    c_in = {s.index: s.contrast_out for s in in_scores}
    ratios = [s.contrast_out / c_in[s.index] for s in out_scores
              if s.index in c_in and abs(s.contrast_ref) >= min_ref_contrast
              and s.contrast_ref != 0 and c_in[s.index] * s.contrast_ref > 0]
    return {
        "kept_vs_input": float(np.mean([r >= keep for r in ratios])) if ratios else math.nan,
        "contrast_ratio_to_input": float(np.mean(ratios)) if ratios else math.nan,
        "n_kept_eval": float(len(ratios)),
    }


def summarize_lesions(scores: list[LesionScore], min_diameter_mm: float = 5.0,
                      visible_contrast: float | None = None) -> dict[str, float]:
    """Aggregate: lesions >= ``min_diameter_mm`` (Dice) and all lesions (contrast ratio).

    ``contrast_error`` is the mean absolute contrast error ``|c_out - c_ref|`` (image units),
    defined for every lesion. With ``visible_contrast`` the contrast ratio is also reported
    over the lesions whose reference contrast is at least that large (``*_visible``): a ratio
    to a reference contrast near 0 (a lesion of 1 HU in a brain phantom) is noise, not a
    measure of contrast kept, so "within 10 %" is only meaningful for those.
    """
    big = [s for s in scores if s.diameter_mm >= min_diameter_mm]
    small = [s for s in scores if s.diameter_mm < min_diameter_mm]
    ratios = [s.contrast_ratio for s in scores if not math.isnan(s.contrast_ratio)]

    def mean(v: list[float]) -> float:
        return float(np.mean(v)) if v else math.nan

    def within(v: list[LesionScore]) -> float:
        return mean(
            [float(abs(s.contrast_ratio - 1) <= 0.1) for s in v if not math.isnan(s.contrast_ratio)]
        )

    res = {
        "lesions": float(len(scores)),
        "dice_ge5mm": mean([s.dice for s in big]),
        "dice_lt5mm": mean([s.dice for s in small]),
        "contrast_ratio": mean(ratios),
        "contrast_ratio_ge5mm": mean([s.contrast_ratio for s in big]),
        "contrast_within_10pct": mean([float(abs(x - 1) <= 0.1) for x in ratios]),
        "contrast_error": mean([abs(s.contrast_out - s.contrast_ref) for s in scores]),
    }
    if visible_contrast is not None:
        vis = [s for s in scores if abs(s.contrast_ref) >= visible_contrast]
        res.update(
            {
                "n_visible": float(len(vis)),
                "contrast_ratio_visible": mean([s.contrast_ratio for s in vis]),
                "contrast_within_10pct_visible": within(vis),
                "contrast_within_10pct_ge5mm_visible": within(
                    [s for s in vis if s.diameter_mm >= min_diameter_mm]
                ),
                "contrast_within_10pct_lt5mm_visible": within(
                    [s for s in vis if s.diameter_mm < min_diameter_mm]
                ),
            }
        )
    return res
