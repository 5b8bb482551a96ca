"""The watermark's fidelity bound, by what the stored values mean.

* HU-calibrated CT outputs: max |change| <= ``hu_max_change`` HU (4 HU by default: well under a
  quarter of the quantum noise of diagnostic CT, ~10 - 20 HU RMS in soft tissue). With Rescale
  Slope s the bound in stored units is floor(hu_max_change / s).
* Every other output (MR, CR, values without a physical unit): marked at
  ``other_max_delta`` stored units (2 by default), PSNR >= ``min_psnr_db`` (50 dB) at the
  stored bit depth (peak 2^Bits Stored - 1, as the bound was measured before; the ledger
  also records the PSNR over the slice's own value range). Where 2 units cannot carry a
  readable mark (a smooth or noisy image: the pipeline verifies each mark as dispatch will
  check it), the bound may rise below the image noise, up to ``other_noise_fraction`` x
  the estimated noise sd (0.5 by default, the rule the pipeline shipped with), never past
  the PSNR floor. 0 forbids any rise: such outputs stay unverified, dispatch refuses them.

The bound is an input of the embedder and is recorded, with the change and PSNR measured on
the marked output, in the ``output.created`` ledger event (see :meth:`FidelityBound.record`
and :func:`measure`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from audit.watermark.core import noise_sigma

#: RMS of the embedded change per unit of max_delta for strength 2 (measured: most pixels at
#: +-max_delta; 0.87 x max_delta at 2 HU); a slight over-estimate keeps the PSNR floor safe.
_RMS_PER_DELTA = 0.9


@dataclass(frozen=True)
class FidelityBound:
    """The configured bound (``watermark.hu_max_change``, ``watermark.other_max_delta``,
    ``watermark.min_psnr_db``, ``watermark.other_noise_fraction``)."""

    hu_max_change: float = 4.0
    other_max_delta: int = 2
    min_psnr_db: float = 50.0
    other_noise_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 1.0 <= self.hu_max_change <= 64.0:
            raise ValueError("hu_max_change must be in 1..64 HU")
        if not 1 <= self.other_max_delta <= 64:
            raise ValueError("other_max_delta must be in 1..64 stored units")
        if not 30.0 <= self.min_psnr_db <= 100.0:
            raise ValueError("min_psnr_db must be in 30..100 dB")
        if not 0.0 <= self.other_noise_fraction <= 0.5:
            raise ValueError("other_noise_fraction must be in 0..0.5")

    def psnr_ceiling(self, peak: float) -> int:
        """Largest max_delta whose mark keeps PSNR >= min_psnr_db at data range ``peak``."""
        rms = peak * 10.0 ** (-self.min_psnr_db / 20.0)
        return max(1, math.floor(rms / _RMS_PER_DELTA))

    def limits(self, array: NDArray, *, hu: bool, slope: float = 1.0,
               peak: float | None = None) -> tuple[int, int]:
        """(start, ceiling) of max_delta in stored units for one output.

        HU: both floor(hu_max_change / slope) (at least 1). Other: start at other_max_delta;
        ceiling the larger of that and ``other_noise_fraction`` x the noise sd; both capped by
        the PSNR floor at ``peak`` (the stored bit depth's 2^bits - 1; default: the array's
        range).
        """
        if hu:
            d = max(1, math.floor(self.hu_max_change / max(float(slope), 1e-9)))
            return d, d
        arr = np.asarray(array)
        rng = float(peak) if peak is not None else float(arr.max()) - float(arr.min())
        cap = self.psnr_ceiling(max(rng, 1.0))
        start = min(self.other_max_delta, cap)
        ceiling = start
        if self.other_noise_fraction > 0:
            ceiling = max(start, min(cap, int(self.other_noise_fraction * noise_sigma(arr))))
        return start, ceiling

    def record(self, *, hu: bool) -> dict[str, Any]:
        """The bound as recorded with an output (ledger / provenance; the ledger's canonical
        form allows no floats, so non-integers are decimal strings)."""
        if hu:
            return {"unit": "HU", "max_change": decimal(self.hu_max_change)}
        return {"unit": "stored", "max_change": self.other_max_delta,
                "min_psnr_db": decimal(self.min_psnr_db),
                "noise_fraction": decimal(self.other_noise_fraction)}


def decimal(x: float) -> int | str:
    """``x`` for a ledger leaf: an int when integral, else its shortest decimal string."""
    return int(x) if float(x).is_integer() else f"{x:.6g}"


def psnr_db(original: NDArray, marked: NDArray, peak: float | None = None) -> float:
    """PSNR of ``marked`` against ``original`` (dB) with the data range ``peak`` (default:
    the original's range); inf when nothing changed."""
    a = np.asarray(original, dtype=np.float64)
    b = np.asarray(marked, dtype=np.float64)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    rng = float(peak) if peak is not None else max(float(a.max() - a.min()), 1.0)
    return 10.0 * math.log10(rng * rng / mse)


def measure(original: NDArray, marked: NDArray, *, slope: float = 1.0,
            hu: bool, peak: float | None = None) -> dict[str, Any]:
    """Fidelity measured on one marked output, for the ledger: max |change| in stored units
    (and in HU for HU outputs), the PSNR at ``peak`` (the stored bit depth; default the
    value range) and over the value range of each slice (``psnr_range_db``), both in dB,
    per frame the lowest, as decimal strings (None when nothing changed)."""
    out = _measure(original, marked, slope=slope, hu=hu, peak=peak)
    out["psnr_range_db"] = _measure(original, marked, slope=slope, hu=hu, peak=None)["psnr_db"]
    return out


def _measure(original: NDArray, marked: NDArray, *, slope: float,
             hu: bool, peak: float | None) -> dict[str, Any]:
    a = np.asarray(original, dtype=np.int64)
    b = np.asarray(marked, dtype=np.int64)
    change = int(np.abs(b - a).max()) if a.size else 0
    frames = a.reshape(-1, *a.shape[-2:]) if a.ndim >= 2 else a[None, None]
    marks = b.reshape(frames.shape)
    worst = min(psnr_db(f, m, peak) for f, m in zip(frames, marks, strict=True))
    out: dict[str, Any] = {"max_change_stored": change,
                           "psnr_db": None if math.isinf(worst) else f"{worst:.2f}"}
    if hu:
        out["max_change_hu"] = decimal(round(change * float(slope), 3))
    return out
