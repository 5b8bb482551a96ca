"""Classical baselines the diffusion models are compared with on the same held-out data.

* Restoration: non-local means (Buades, Coll & Morel, CVPR 2005) through
  ``skimage.restoration.denoise_nl_means`` with the noise SD estimated per slice by the
  wavelet median-absolute-deviation estimator on the finest diagonal Haar sub-band
  (Donoho & Johnstone, Biometrika 81:425, 1994: sigma = median|HH1| / 0.6745) and filtering
  strength ``h = h_factor * sigma``.
  ``h_factor`` defaults to the value tuned on the *validation* split (bench/results/
  engine_eval.md), never on test data.
* CT -> MR: a piecewise-linear lookup from (lightly smoothed) HU to MR intensity, fitted on
  training pairs as the median MR value per HU bin. It is what an intensity-only mapping can
  do; anything that needs spatial context (e.g. tissues with equal HU but different MR) it
  cannot.

All baselines are callables ``Volume -> Volume`` like the engine's models.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from scipy import ndimage
from skimage.restoration import denoise_nl_means

from engine.types import Intensity, Volume

log = logging.getLogger(__name__)

NLM_PATCH = 5
NLM_DISTANCE = 6
NLM_H_FACTOR_CT = 1.2
NLM_H_FACTOR_MR = 0.6
CT_SIGMA_FLOOR_HU = -500.0  # estimate CT noise on blocks denser than this (the body)


def estimate_sigma(img: np.ndarray, floor: float | None = None) -> float:
    """Noise SD of a 2-D image: median absolute finest diagonal Haar coefficient / 0.6745.

    Only 2x2 blocks whose mean exceeds ``floor`` count (default: 10 % of the 99th
    percentile, i.e. the foreground), so empty air outside a CT reconstruction circle or a
    zero-filled MR background does not pull the median to zero.
    """
    x = np.asarray(img, dtype=np.float64)
    x = x[: x.shape[0] // 2 * 2, : x.shape[1] // 2 * 2]
    a, b, c, d = x[0::2, 0::2], x[0::2, 1::2], x[1::2, 0::2], x[1::2, 1::2]
    hh = (a - b - c + d) / 2.0
    mean = (a + b + c + d) / 4.0
    lo = 0.1 * float(np.percentile(x, 99)) if floor is None else floor
    sel = mean > lo
    if sel.sum() < 16:
        sel = np.ones_like(sel)
    return float(np.median(np.abs(hh[sel])) / 0.6745)


def nlm_slice(img: np.ndarray, h_factor: float, sigma: float | None = None,
              floor: float | None = None) -> np.ndarray:
    """Non-local means of one 2-D slice; ``sigma`` estimated (above ``floor``) when not given."""
    img = np.asarray(img, dtype=np.float64)
    s = estimate_sigma(img, floor) if sigma is None else float(sigma)
    if s <= 0:
        return img.astype(np.float32)
    out = denoise_nl_means(img, patch_size=NLM_PATCH, patch_distance=NLM_DISTANCE,
                           h=h_factor * s, sigma=s, fast_mode=True)
    return out.astype(np.float32)


@dataclass(frozen=True)
class NLMDenoiser:
    """Slice-by-slice non-local means; a ``Volume -> Volume`` restoration baseline."""

    h_factor: float = NLM_H_FACTOR_CT

    def __call__(self, volume: Volume) -> Volume:
        floor = CT_SIGMA_FLOOR_HU if volume.intensity == Intensity.HU else None
        data = np.stack([nlm_slice(s, self.h_factor, floor=floor) for s in volume.data])
        return Volume(data, volume.spacing, volume.intensity)


def nlm_ct() -> NLMDenoiser:
    return NLMDenoiser(NLM_H_FACTOR_CT)


def nlm_mr() -> NLMDenoiser:
    return NLMDenoiser(NLM_H_FACTOR_MR)


# HU knots: dense in soft tissue, sparse in air and bone.
_KNOTS = np.concatenate([np.arange(-1000, -200, 50), np.arange(-200, 300, 5),
                         np.arange(300, 1600, 50)]).astype(np.float64)


@dataclass(frozen=True)
class HuLut:
    """Piecewise-linear HU -> MR intensity map (a ``Volume -> Volume`` CT->MR baseline).

    ``knots`` HU values, ``values`` MR intensity at each knot; the CT is smoothed with a
    Gaussian of ``smooth_px`` pixels before the lookup (noise robustness).
    """

    knots: tuple[float, ...]
    values: tuple[float, ...]
    target: Intensity
    smooth_px: float = 1.0

    def __post_init__(self) -> None:
        if len(self.knots) != len(self.values) or len(self.knots) < 2:
            raise ValueError("knots and values must have the same length >= 2")
        if any(b <= a for a, b in pairwise(self.knots)):
            raise ValueError("knots must increase strictly")

    @classmethod
    def fit(cls, pairs: Iterable[tuple[np.ndarray, np.ndarray]], target: Intensity | str,
            smooth_px: float = 1.0) -> HuLut:
        """Median MR per HU bin over ``(ct_hu, mr)`` training pairs (same shapes)."""
        hu_all, mr_all = [], []
        for ct, mr in pairs:
            ct = np.asarray(ct, dtype=np.float64)
            if ct.shape != np.shape(mr):
                raise ValueError(f"pair shapes differ: {ct.shape} vs {np.shape(mr)}")
            sm = _smooth(ct, smooth_px)
            hu_all.append(sm.ravel())
            mr_all.append(np.asarray(mr, dtype=np.float64).ravel())
        hu = np.concatenate(hu_all)
        mr = np.concatenate(mr_all)
        edges = np.concatenate([[-np.inf], 0.5 * (_KNOTS[1:] + _KNOTS[:-1]), [np.inf]])
        which = np.digitize(hu, edges) - 1
        order = np.argsort(which, kind="stable")
        which_s, mr_s = which[order], mr[order]
        bounds = np.searchsorted(which_s, np.arange(len(_KNOTS) + 1))
        knots, values = [], []
        for i in range(len(_KNOTS)):
            seg = mr_s[bounds[i]:bounds[i + 1]]
            if len(seg) >= 5:
                knots.append(float(_KNOTS[i]))
                values.append(float(np.median(seg)))
        if len(knots) < 2:
            raise ValueError("not enough training data to fit the lookup")
        return cls(tuple(knots), tuple(values), Intensity(target), smooth_px)

    def __call__(self, volume: Volume) -> Volume:
        if volume.intensity != Intensity.HU:
            raise ValueError(f"HuLut needs CT (HU) input, got {volume.intensity.value}")
        sm = _smooth(np.asarray(volume.data, dtype=np.float64), self.smooth_px)
        out = np.interp(sm, self.knots, self.values).astype(np.float32)
        return Volume(out, volume.spacing, self.target)

    def to_json(self) -> str:
        return json.dumps({"knots": self.knots, "values": self.values,
                           "target": self.target.value, "smooth_px": self.smooth_px})

    @classmethod
    def from_json(cls, text: str) -> HuLut:
        d = json.loads(text)
        return cls(tuple(d["knots"]), tuple(d["values"]), Intensity(d["target"]),
                   float(d["smooth_px"]))


def _smooth(ct: np.ndarray, px: float) -> np.ndarray:
    if px <= 0:
        return ct
    sig = (0.0, px, px) if ct.ndim == 3 else px
    return ndimage.gaussian_filter(ct, sig)


def fit_phantom_luts(n: int = 24, size: int = 256, smooth_px: float = 1.0
                     ) -> dict[str, HuLut]:
    """T1w and T2w lookups fitted on ``n`` *training-split* phantoms (mixed abdomen / head).

    The CT input is the normal-dose simulation (dose 1.0) like the evaluation input; the MR
    targets are noise- and bias-free, like the evaluation references.
    """
    from engine.research.degrade import low_dose_ct
    from engine.research.phantoms import iter_dataset

    t1, t2 = [], []
    for s in iter_dataset("train", n, size=size, n_slices=1, kind="mixed",
                          mr_snr=None, bias_strength=0.0):
        ct = low_dose_ct(s.ct_hu, s.spacing[1], 1.0, seed=s.seed)
        t1.append((ct, s.t1w))
        t2.append((ct, s.t2w))
    return {"t1w": HuLut.fit(t1, Intensity.MR_T1W, smooth_px),
            "t2w": HuLut.fit(t2, Intensity.MR_T2W, smooth_px)}


def tune_nlm(n: int = 4, sizes: tuple[int, ...] = (256, 512), dose: float = 0.25,
             snr: float = 20.0, factors: tuple[float, ...] = (0.6, 0.9, 1.2, 1.5, 2.0)
             ) -> list[dict[str, float]]:
    """PSNR of NLM for each ``h_factor`` on *validation* phantoms (CT at ``dose``, T1w at ``snr``).

    This is how ``NLM_H_FACTOR_CT`` / ``NLM_H_FACTOR_MR`` were chosen
    (``python -m engine.research.baselines``; numbers in bench/results/engine_eval.md).
    """
    from engine.research.degrade import low_dose_ct, mr_noise
    from engine.research.metrics import CT_RANGE, mr_range, psnr
    from engine.research.phantoms import iter_dataset

    rows = []
    for size in sizes:
        acc: dict[float, list[tuple[float, float]]] = {h: [] for h in factors}
        for s in iter_dataset("val", n, size=size, kind="mixed", mr_snr=None, bias_strength=0.0):
            ld = low_dose_ct(s.ct_hu, s.spacing[1], dose, seed=s.seed)
            mr = mr_noise(s.t1w, snr, seed=s.seed)
            for h in factors:
                o_ct = nlm_slice(ld[0], h, floor=CT_SIGMA_FLOOR_HU)[None]
                o_mr = nlm_slice(mr[0], h)[None]
                acc[h].append((psnr(s.ct_hu, o_ct, CT_RANGE), psnr(s.t1w, o_mr, mr_range(s.t1w))))
        for h in factors:
            m = np.mean(acc[h], axis=0)
            rows.append({"size": size, "h_factor": h, "ct_psnr": float(m[0]),
                         "mr_psnr": float(m[1])})
    return rows


if __name__ == "__main__":  # pragma: no cover - tuning entry point
    for row in tune_nlm():
        print(f"size {row['size']:4d}  h {row['h_factor']:.1f}  CT PSNR {row['ct_psnr']:.2f} dB"
              f"  MR PSNR {row['mr_psnr']:.2f} dB")
