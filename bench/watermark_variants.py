"""Experimental watermark detectors (bench only; the product ships one detector per
:class:`audit.watermark.MarkFormat`).

These were the module-level switches of ``audit/watermark/core.py`` until the mark format was
frozen (HOST, HOST_SIZE, SYNC_HOST, CLIP_MASK, EDGE_SIZE): each was measured on the
mini-benchmark and rejected (docs/watermark.md, "Round of 2026-12-03"). Run one with
``python bench/bench_watermark.py --mini --set variant=NAME``. The embedder-side switches
(TILT, TILT_JPEG: a spectral tilt of the mark's amplitudes) were also rejected; their code is
in the git history of ``audit/watermark/pattern.py`` (before the mark format was frozen), and
the JPEG table they used is kept here for ``--flat-survival``.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from audit.watermark import WatermarkKey
from audit.watermark import core as wm_core
from audit.watermark.format import MarkFormat

# ITU-T T.81 Annex K luminance quantisation table (rows: vertical DCT frequency v, columns: u).
JPEG_LUMA = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=np.float64)


def _gauss(x: NDArray[np.float32], fmt: MarkFormat) -> NDArray[np.float32]:
    return x - ndimage.gaussian_filter(x, fmt.hp_sigma, mode="reflect", truncate=3.0)


def _median(size: int) -> Callable[[NDArray[np.float32], MarkFormat], NDArray[np.float32]]:
    def host(x: NDArray[np.float32], fmt: MarkFormat) -> NDArray[np.float32]:
        return x - ndimage.median_filter(x, size, mode="reflect")
    return host


def _median_hp(x: NDArray[np.float32], fmt: MarkFormat) -> NDArray[np.float32]:
    r = x - ndimage.median_filter(x, 5, mode="reflect")
    return r - ndimage.gaussian_filter(r, fmt.hp_sigma, mode="reflect", truncate=3.0)


def _wiener(x: NDArray[np.float32], fmt: MarkFormat) -> NDArray[np.float32]:
    from scipy.signal import wiener

    return (x - wiener(x.astype(np.float64), 5)).astype(np.float32)


def _whiten_host(host: Callable[[NDArray[np.float32], MarkFormat], NDArray[np.float32]]
                 ) -> Callable[[NDArray[np.float32], MarkFormat], NDArray[np.float32]]:
    def whiten(x: NDArray[np.float32], fmt: MarkFormat) -> NDArray[np.float32]:
        return wm_core.normalise_residual(host(x, fmt).astype(np.float32), fmt)
    return whiten


def _whiten_edge(size: int) -> Callable[[NDArray[np.float32], MarkFormat], NDArray[np.float32]]:
    """Normalise by the largest local energy nearby (masks the high-pass ringing at edges)."""
    def whiten(x: NDArray[np.float32], fmt: MarkFormat) -> NDArray[np.float32]:
        r = _gauss(x, fmt)
        e = ndimage.uniform_filter(r * r, fmt.local_size, mode="reflect")
        e = ndimage.maximum_filter(e, size, mode="reflect")
        return wm_core.normalise_residual(r, fmt, energy=e)
    return whiten


def _whiten_clip_mask(x: NDArray[np.float32], fmt: MarkFormat) -> NDArray[np.float32]:
    """Saturated pixels (image min / max) left out; normalised-convolution host."""
    lo, hi = float(x.min()), float(x.max())
    m = (x > lo) & (x < hi)
    if m.mean() > 0.99 or not m.any():
        return wm_core.whiten(x, fmt)
    mf = m.astype(np.float32)
    num = ndimage.gaussian_filter(x * mf, fmt.hp_sigma, mode="reflect", truncate=3.0)
    den = ndimage.gaussian_filter(mf, fmt.hp_sigma, mode="reflect", truncate=3.0)
    r = np.where(m, x - num / np.maximum(den, 1e-3), 0.0).astype(np.float32)
    e = ndimage.uniform_filter(r * r, fmt.local_size, mode="reflect")
    cnt = ndimage.uniform_filter(mf, fmt.local_size, mode="reflect")
    e = np.where(cnt > 0.05, e / np.maximum(cnt, 0.05), 0.0).astype(np.float32)
    u = wm_core.normalise_residual(r, fmt, energy=e)
    u[~m] = 0.0
    return u


VARIANTS: dict[str, Callable[[NDArray[np.float32], MarkFormat], NDArray[np.float32]]] = {
    "median": _whiten_host(_median(5)),
    "median3": _whiten_host(_median(3)),
    "median_hp": _whiten_host(_median_hp),
    "wiener": _whiten_host(_wiener),
    "clip_mask": _whiten_clip_mask,
    "edge9": _whiten_edge(9),
}


def detect_variant(image: NDArray, keys: list[WatermarkKey], fmt: MarkFormat,
                   variant: str | None) -> wm_core.Detection:
    """:func:`audit.watermark.detect` for one format with an experimental whitening."""
    slices = wm_core._to_float_slices(image)
    whiten = VARIANTS[variant] if variant else wm_core.whiten
    thr = wm_core.threshold_for(len(keys), wm_core.DEFAULT_SCALES, wm_core.DEFAULT_FPR, (fmt,))
    return wm_core.detect_whitened([whiten(x, fmt) for x in slices], keys,
                                   scales=wm_core.DEFAULT_SCALES, threshold=thr, fmt=fmt)
