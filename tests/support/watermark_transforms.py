"""The watermark benchmark's transforms (what a mark must survive), shared by
bench/bench_watermark.py and tests/audit/test_watermark_transforms.py so that both measure
the same thing: lossless re-encoding through pydicom's encoders, lossy JPEG 2000 10:1,
bit-depth rescale, +-1 LSB noise, 8-bit windows saved as PNG, JPEG q90 / q75, resize, crop,
brightness / contrast, and a regeneration proxy (noise + non-local means)."""
from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from audit.watermark import core as wm_core

__all__ = ["SLOW_TRANSFORMS", "TRANSFORMS", "Slice", "Transform", "to_stored", "window8",
           "window_presets", "wilson"]


@dataclass
class Slice:
    """Stored values of one slice with the attributes the mark needs."""

    arr: NDArray[np.integer]
    bits: int
    signed: bool
    slope: float = 1.0
    intercept: float = 0.0
    ct: bool = True
    source: str = ""

    @property
    def limits(self) -> tuple[int, int]:
        return wm_core.valid_limits(self.bits, self.signed, None)


def to_stored(values: NDArray[np.floating], bits: int, signed: bool) -> NDArray[np.integer]:
    lo, hi = wm_core.valid_limits(bits, signed, None)
    dtype = np.int16 if signed else np.uint16
    return np.clip(np.rint(values), lo, hi).astype(dtype)


def dicom_roundtrip(s: Slice, arr: NDArray, uid: str, **kw: object) -> NDArray:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = s.bits
    ds.HighBit = s.bits - 1
    ds.PixelRepresentation = int(s.signed)
    arr = np.ascontiguousarray(arr)
    ds.PixelData = arr.tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.compress(uid, arr, **kw)
        return ds.pixel_array


def window_presets(s: Slice, arr: NDArray) -> dict[str, tuple[float, float]]:
    """(level, width) presets in stored units: CT in HU, others from percentiles."""
    if s.ct:
        hu = {"brain": (40.0, 80.0), "soft": (40.0, 400.0), "lung": (-600.0, 1500.0)}
        return {k: ((lv - s.intercept) / s.slope, w / s.slope) for k, (lv, w) in hu.items()}
    arr = arr.astype(np.float64)
    p1, p25, p50, p75, p99 = np.percentile(arr, [1, 25, 50, 75, 99])
    return {"brain": (p50, max(p75 - p25, 1.0)), "soft": ((p1 + p99) / 2, max(p99 - p1, 1.0)),
            "lung": ((arr.min() + arr.max()) / 2, max(float(arr.max() - arr.min()), 1.0))}


def window8(arr: NDArray, level: float, width: float) -> NDArray[np.uint8]:
    """Linear VOI window to 8 bits (PS3.3 C.11.2.1.2 without the 0.5 offsets)."""
    x = (arr.astype(np.float64) - (level - width / 2.0)) / width * 255.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def png(img: NDArray[np.uint8]) -> NDArray[np.uint8]:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())))


def jpeg(img: NDArray[np.uint8], quality: int) -> NDArray[np.uint8]:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())))


def resize(arr: NDArray, factor: float) -> NDArray[np.float32]:
    from PIL import Image

    img = Image.fromarray(arr.astype(np.float32), mode="F")
    size = (max(1, round(arr.shape[1] * factor)), max(1, round(arr.shape[0] * factor)))
    return np.asarray(img.resize(size, Image.BICUBIC))


def rescale_depth(s: Slice, arr: NDArray) -> NDArray:
    """Store at the other bit depth (12 <-> 16) with a new rescale slope / intercept."""
    new_bits = 16 if s.bits <= 12 else 12
    lo, hi = float(arr.min()), float(arr.max())
    factor = (2 ** new_bits - 1) / max(hi - lo, 1.0)
    return to_stored((arr.astype(np.float64) - lo) * factor, new_bits, False)


def crop(arr: NDArray, rng: np.random.Generator) -> NDArray:
    ny, nx = arr.shape
    t, b = (int(rng.integers(1, max(2, ny // 10 + 1))) for _ in range(2))
    left, r = (int(rng.integers(1, max(2, nx // 10 + 1))) for _ in range(2))
    return arr[t : ny - b, left : nx - r]


def lsb_noise(s: Slice, arr: NDArray, rng: np.random.Generator) -> NDArray:
    lo, hi = s.limits
    return np.clip(arr.astype(np.int64) + rng.integers(-1, 2, arr.shape), lo, hi).astype(arr.dtype)


def soft8(s: Slice, arr: NDArray) -> NDArray[np.uint8]:
    return window8(arr, *window_presets(s, arr)["soft"])


def regenerate(s: Slice, arr: NDArray, rng: np.random.Generator) -> NDArray:
    """Regeneration proxy: add Gaussian noise (sigma = 2 % of the soft window), then
    non-local-means denoise (skimage), as a stand-in for a diffusion model's re-generation."""
    from skimage.restoration import denoise_nl_means

    x = arr.astype(np.float64)
    width = window_presets(s, arr)["soft"][1]
    noisy = x + rng.normal(0, 0.02 * width, x.shape)
    d = np.diff(noisy, axis=1)  # robust noise estimate (MAD of horizontal differences)
    sig = float(np.median(np.abs(d - np.median(d))) / 0.6745 / math.sqrt(2))
    return denoise_nl_means(noisy, h=0.8 * sig, sigma=sig, patch_size=5, patch_distance=6, fast_mode=True)


Transform = Callable[[Slice, NDArray, np.random.Generator], NDArray]

TRANSFORMS: dict[str, Transform] = {
    "none": lambda s, a, r: a,
    "rle": lambda s, a, r: dicom_roundtrip(s, a, "1.2.840.10008.1.2.5"),
    "jpeg-ls lossless": lambda s, a, r: dicom_roundtrip(s, a, "1.2.840.10008.1.2.4.80"),
    "j2k lossless": lambda s, a, r: dicom_roundtrip(s, a, "1.2.840.10008.1.2.4.90"),
    "j2k lossy 10:1": lambda s, a, r: dicom_roundtrip(s, a, "1.2.840.10008.1.2.4.91", j2k_cr=[10]),
    "bit-depth rescale": lambda s, a, r: rescale_depth(s, a),
    "+-1 LSB noise": lsb_noise,
    "png window brain": lambda s, a, r: png(window8(a, *window_presets(s, a)["brain"])),
    "png window soft": lambda s, a, r: png(soft8(s, a)),
    "png window lung": lambda s, a, r: png(window8(a, *window_presets(s, a)["lung"])),
    "jpeg q90 (soft)": lambda s, a, r: jpeg(soft8(s, a), 90),
    "jpeg q75 (soft)": lambda s, a, r: jpeg(soft8(s, a), 75),
    "jpeg q75 (lung)": lambda s, a, r: jpeg(window8(a, *window_presets(s, a)["lung"]), 75),
    "resize 0.5x": lambda s, a, r: resize(a, 0.5),
    "resize 2x": lambda s, a, r: resize(a, 2.0),
    "crop <=10%/side": lambda s, a, r: crop(a, r),
    "brightness x1.5 (8-bit)": lambda s, a, r: np.clip(soft8(s, a).astype(np.float64) * 1.5, 0, 255).astype(np.uint8),
    "contrast x1.5 (8-bit)": lambda s, a, r: np.clip(
        (soft8(s, a).astype(np.float64) - 128.0) * 1.5 + 128.0, 0, 255).astype(np.uint8),
}
SLOW_TRANSFORMS: dict[str, Transform] = {"regeneration (noise + NLM)": regenerate}
# Every positive is detected untransformed; each light transform runs on a random 1 / LIGHT_EVERY
# of the positives and the costly codecs / 2x up-sampling on a random 1 / HEAVY_EVERY (2 shared
# CPU cores); the table's n column says how many.
def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))
