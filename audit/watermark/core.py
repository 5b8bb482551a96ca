"""Embedder and detector (arrays only; no DICOM here).

Embedding adds ``clip(round(strength * max_delta * w), -max_delta, max_delta)`` where ``w`` is
the unit-variance keyed tile of :mod:`audit.watermark.pattern` repeated over every slice,
then clips to the valid range (saturation, never wrap-around). The default strength 2 puts
most pixels at +-max_delta: more mark energy under the same max |delta|.

Detection is invariant to affine intensity maps (windowing, rescale slope / intercept,
brightness / contrast) and tolerant of clipping: the image is high-passed and divided by the
local variance (inverse-variance weighting: quiet areas, where the mark dominates, count
more), folded modulo the tile period, Fourier transformed, and each bin is divided by the
host power estimated from its neighbouring bins (per-bin SNR weighting). The sync template's
correlation over all circular shifts, normalised by its exact null standard deviation given
the weights, has on an unmarked image approximately N(0, 1) values (sub-Gaussian: a weighted
sum of cosines of independent uniform phases), so the maximum over the ``TILE**2`` shifts x
scales x keys hypotheses has a Bonferroni-bounded false-positive rate; the threshold is set
from that bound (and checked empirically in bench/). The payload is read at the best shift
and decoded with soft Viterbi (the SNR weights make the soft bits reliability-scaled); it is
accepted only when its CRC matches and the score is at least the format's ``decode_gate``.

Every parameter comes from a frozen, versioned :class:`audit.watermark.format.MarkFormat`
passed explicitly (default: the shipped ``CURRENT_FORMAT``); :func:`detect` reads every
registered format, so old marks stay readable.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.stats import norm

from audit.watermark import ecc
from audit.watermark.format import CURRENT_FORMAT, MarkFormat, readers
from audit.watermark.key import WatermarkKey
from audit.watermark.pattern import bins, layout, mark_tile, max_component, sync_reference

logger = logging.getLogger(__name__)

PAYLOAD_BITS = ecc.PAYLOAD_BITS
MARK_ID_BITS = 40
DEFAULT_FPR = 1e-3
DEFAULT_SCALES: tuple[float, ...] = (1.0, 2.0, 0.5)
MAX_DELTA_LIMIT = 1024  # sanity bound of embed(); the bound in use comes from the caller
VERIFY_NOISE_FRACTION = 0.5  # embed_verified() raises the bound up to this x the noise sd
VERIFY_MAX_FRAMES = 8  # frames of one instance pooled by a receiver's check
_ABS_MEAN = 0.81056  # E|cos a + cos b|, a, b uniform (Monte Carlo 1e8)
_ABS_VAR = 0.34296


# ----------------------------------------------------------------------------- payload


def make_payload(key_id: int, mark_id: int) -> int:
    """48-bit payload = key id (8 bits) || mark id (40 bits)."""
    if not 0 <= key_id <= 255:
        raise ValueError("key_id must be in 0..255")
    if not 0 <= mark_id < (1 << MARK_ID_BITS):
        raise ValueError(f"mark_id must fit in {MARK_ID_BITS} bits")
    return (key_id << MARK_ID_BITS) | mark_id


def split_payload(payload: int) -> tuple[int, int]:
    """Inverse of :func:`make_payload`: (key id, mark id)."""
    return payload >> MARK_ID_BITS, payload & ((1 << MARK_ID_BITS) - 1)


def payload_hex(payload: int) -> str:
    """Canonical 12-digit lower-case hex form (the ledger's ``watermark_payload``)."""
    return f"{payload:012x}"


def _info_bits(key: WatermarkKey, payload: int,
               fmt: MarkFormat = CURRENT_FORMAT) -> NDArray[np.uint8]:
    crc = ecc.crc16_ccitt(bytes([key.key_id]) + payload.to_bytes(6, "big"))
    bits = np.concatenate(
        [ecc.int_to_bits(payload, PAYLOAD_BITS), ecc.int_to_bits(crc, ecc.CRC_BITS)]
    )
    return bits ^ layout(key, fmt).scramble


def codeword(key: WatermarkKey, payload: int,
             fmt: MarkFormat = CURRENT_FORMAT) -> NDArray[np.uint8]:
    """The 140 coded bits carried for ``payload`` under ``key`` (bench / tests use it)."""
    return ecc.conv_encode(_info_bits(key, payload, fmt))


def _check_info(key: WatermarkKey, info: NDArray[np.uint8],
                fmt: MarkFormat = CURRENT_FORMAT) -> tuple[int, bool]:
    bits = info ^ layout(key, fmt).scramble
    payload = ecc.bits_to_int(bits[:PAYLOAD_BITS])
    crc = ecc.bits_to_int(bits[PAYLOAD_BITS:])
    ok = crc == ecc.crc16_ccitt(bytes([key.key_id]) + payload.to_bytes(6, "big"))
    return payload, ok


# ----------------------------------------------------------------------------- embed


def valid_limits(
    bits_stored: int, signed: bool, valid_range: tuple[int, int] | None
) -> tuple[int, int]:
    """Range allowed by Bits Stored / Pixel Representation (PS3.3 C.7.6.3.1) and the caller."""
    if not 1 <= bits_stored <= 16:
        raise ValueError("bits_stored must be in 1..16")
    lo, hi = (
        (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1)
        if signed
        else (0, (1 << bits_stored) - 1)
    )
    if valid_range is not None:
        vlo, vhi = int(valid_range[0]), int(valid_range[1])
        if vlo > vhi:
            raise ValueError("valid_range must be (low, high) with low <= high")
        lo, hi = max(lo, vlo), min(hi, vhi)
        if lo > hi:
            raise ValueError("valid_range does not intersect the stored range")
    return lo, hi


def _tiled(tile: NDArray[np.float64], shape: tuple[int, int]) -> NDArray[np.float64]:
    ny, nx = shape
    t = tile.shape[0]
    reps = (-(-ny // t), -(-nx // t))
    return np.tile(tile, reps)[:ny, :nx]


def mark_delta(key: WatermarkKey, payload: int, shape: tuple[int, int], *, max_delta: int = 2,
               strength: float | None = None,
               fmt: MarkFormat = CURRENT_FORMAT) -> NDArray[np.int64]:
    """The integer change added to each slice of ``shape`` (before range clipping);
    ``strength`` defaults to the format's."""
    strength = fmt.strength if strength is None else strength
    w = _tiled(mark_tile(key, codeword(key, payload, fmt), fmt), shape)
    return np.clip(np.rint(strength * max_delta * w), -max_delta, max_delta).astype(np.int64)


def embed(array: NDArray[np.integer], key: WatermarkKey, payload: int, *, bits_stored: int,
          signed: bool, max_delta: int = 2, valid_range: tuple[int, int] | None = None,
          strength: float | None = None,
          fmt: MarkFormat = CURRENT_FORMAT) -> NDArray[np.integer]:
    """Embed the keyed mark carrying ``payload``.

    Parameters
    ----------
    array
        2-D (rows, columns) or 3-D (frames, rows, columns) integer stored values (the
        DICOM Pixel Data before Modality LUT, PS3.3 C.7.6.3 / C.11.1).
    key
        Secret key.
    payload
        48-bit unsigned integer (see :func:`make_payload`).
    bits_stored, signed
        Bits Stored (0028,0101) and Pixel Representation (0028,0103) = 1.
    max_delta
        Largest change of any stored value (stored units; with Rescale Slope 1 = HU).
    valid_range
        Further restricts the output values (e.g. the real data range or above a pixel
        padding value); values are clipped into it, never wrapped.
    strength
        Amplitude of the unit-variance pattern in units of ``max_delta`` before rounding
        (default: ``fmt.strength``).
    fmt
        Mark format (default: the shipped one); record ``fmt.version`` with the mark.

    Returns
    -------
    numpy.ndarray
        Same shape and dtype as ``array``.
    """
    arr = np.asarray(array)
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected a 2-D or 3-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"expected integer stored values, got {arr.dtype}")
    if not 0 <= payload < (1 << PAYLOAD_BITS):
        raise ValueError(f"payload must be an unsigned {PAYLOAD_BITS}-bit integer")
    if not 1 <= max_delta <= MAX_DELTA_LIMIT:
        raise ValueError(f"max_delta must be in 1..{MAX_DELTA_LIMIT}")
    lo, hi = valid_limits(bits_stored, signed, valid_range)
    info = np.iinfo(arr.dtype)
    lo, hi = max(lo, int(info.min)), min(hi, int(info.max))
    delta = mark_delta(key, payload, arr.shape[-2:], max_delta=max_delta, strength=strength,
                       fmt=fmt)
    out = arr.astype(np.int64) + delta  # broadcasts over frames
    # Input values already outside the range are left as they are (no new violation).
    inside = (arr >= lo) & (arr <= hi)
    out = np.where(inside, np.clip(out, lo, hi), arr)
    return out.astype(arr.dtype)


def noise_sigma(array: NDArray) -> float:
    """Robust estimate of the pixel noise standard deviation (stored units) of a slice or
    volume: 1.4826 x MAD of horizontal first differences / sqrt(2)."""
    arr = np.asarray(array, dtype=np.float64)
    d = np.diff(arr, axis=-1).ravel()
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def suggest_max_delta(array: NDArray, *, hu_calibrated: bool, fraction: float = 0.25,
                      floor: int = 2, ceiling: int = 64) -> int:
    """Fidelity bound to pass to :func:`embed`.

    HU-calibrated CT keeps the fixed bound ``floor`` (2 HU by default; the
    pipeline passes its configured bound, docs/watermark.md); other images (MR, 16-bit data
    using the full range) get a bound below the image noise: ``fraction`` x
    :func:`noise_sigma`, at least ``floor``.
    """
    if hu_calibrated:
        return floor
    return int(min(ceiling, max(floor, np.floor(fraction * noise_sigma(array)))))


def sample_frames(n: int, max_frames: int = VERIFY_MAX_FRAMES) -> NDArray[np.int64]:
    """The frames of an ``n``-frame instance that a check pools: all of them when
    ``n <= max_frames``, else ``max_frames`` evenly spaced ones (first and last included).
    Every frame carries the same mark, so a sample judges the instance."""
    if n <= max_frames:
        return np.arange(n)
    return np.linspace(0, n - 1, max_frames).round().astype(np.int64)


@dataclass(frozen=True)
class VerifiedEmbedding:
    """What :func:`embed_verified` did, per unit (a group of frames judged together).

    ``max_delta``: the bound each unit was marked with (``start`` unless it had to be
    raised); ``detected``: whether the mark was found in it at that bound and its payload
    decoded (with the detection ``score``); ``limit``: the highest bound the unit's noise
    allowed."""

    start: int
    max_delta: list[int]
    detected: list[bool]
    score: list[float]
    limit: list[int]
    format_version: int = CURRENT_FORMAT.version

    @property
    def verified(self) -> bool:
        return all(self.detected)

    @property
    def raised(self) -> int:
        """How many units were marked above ``start``."""
        return sum(d > self.start for d in self.max_delta)


def embed_verified(
    array: NDArray[np.integer],
    key: WatermarkKey,
    payload: int,
    *,
    units: list[NDArray[np.int64]] | list[list[int]],
    bits_stored: int,
    signed: bool,
    max_delta: int = 2,
    valid_range: tuple[int, int] | None = None,
    detect_keys: list[WatermarkKey] | None = None,
    noise_fraction: float = VERIFY_NOISE_FRACTION,
    max_frames: int = VERIFY_MAX_FRAMES,
    ceiling: int = MAX_DELTA_LIMIT,
    fmt: MarkFormat = CURRENT_FORMAT,
) -> tuple[NDArray[np.integer], VerifiedEmbedding]:
    """Embed, then check that a receiver finds the mark; raise the bound where it does not.

    ``array`` is (frames, rows, columns); ``units`` partitions the frame indices into the
    groups a receiver judges together (one per single-frame instance, or all frames of a
    multi-frame instance; the detector pools :func:`sample_frames` of a unit). Each unit is
    marked with ``max_delta`` and run through :func:`detect` with ``detect_keys`` (default
    ``[key]``); a unit whose mark is not found, or whose payload does not decode (the link to
    the ledger), is marked again from its unmarked values with
    the bound doubled, while the bound stays at most
    ``max(max_delta, noise_fraction x noise_sigma(unit))`` (below the image noise,
    docs/watermark.md) and at most ``ceiling`` (the configured fidelity bound). A unit
    still not detected at that limit keeps the highest bound tried and is reported
    ``detected=False``; the caller decides what that means. ``fmt``: the mark format (its
    version is reported in the result).
    """
    arr = np.asarray(array)
    if arr.ndim != 3:
        raise ValueError(f"expected a 3-D (frames, rows, columns) array, got shape {arr.shape}")
    seen = sorted(int(i) for u in units for i in u)
    if seen != list(range(arr.shape[0])):
        raise ValueError("units must partition the frame indices 0..frames-1")
    keys = list(detect_keys) if detect_keys else [key]
    out = np.empty_like(arr)
    deltas, found, scores, limits = [], [], [], []
    for unit in units:
        idx = np.asarray(unit, dtype=np.int64)
        host = arr[idx]
        limit = int(min(MAX_DELTA_LIMIT, max(1, ceiling), max(
            max_delta, np.floor(noise_fraction * noise_sigma(host)))))
        probe = sample_frames(len(idx), max_frames)
        delta = min(max_delta, limit)
        while True:
            marked = embed(host, key, payload, bits_stored=bits_stored, signed=signed,
                           max_delta=delta, valid_range=valid_range, fmt=fmt)
            det = detect(marked[probe] if len(idx) > 1 else marked[0], keys, formats=(fmt,))
            ok = det.marked and det.payload == payload
            if ok or delta >= limit:
                break
            delta = min(limit, 2 * delta)
        out[idx] = marked
        deltas.append(delta)
        found.append(bool(ok))
        scores.append(float(det.score))
        limits.append(limit)
    return out, VerifiedEmbedding(max_delta, deltas, found, scores, limits, fmt.version)


# ----------------------------------------------------------------------------- detect


@dataclass(frozen=True)
class Detection:
    """Detector verdict.

    ``score`` combines the sync template's weighted correlation and the payload's
    non-coherent energy, each standardised, as (sync + w energy) / sqrt(1 + w^2) (w: the
    format's ``energy_weight``, 0.3): approximately N(0, 1) per hypothesis on unmarked images.
    ``marked`` is ``score >= threshold`` or a payload that passed its CRC at a hypothesis with
    ``score >= fmt.decode_gate``. ``payload`` is set only when the CRC matched. ``bit_errors``
    counts coded bits whose hard decision disagrees with the decoded codeword (an estimate of
    the channel errors corrected), None when nothing was decoded. ``format_version``: the
    newest registered format read by the detection configuration that found the mark (formats
    that read alike, such as versions 1 and 2, cannot be told apart by the mark; the ledger
    records the version each output was made with).
    """

    marked: bool
    score: float
    threshold: float
    key_id: int | None
    payload: int | None
    bit_errors: int | None = None
    coded_bits: int = ecc.CODED_BITS
    scale: float | None = None
    shift: tuple[int, int] | None = None
    sync_score: float | None = None
    format_version: int | None = None
    soft_bits: NDArray[np.float64] | None = field(default=None, repr=False, compare=False)

    @property
    def payload_hex(self) -> str | None:
        return None if self.payload is None else payload_hex(self.payload)


def threshold_for(
    n_keys: int, scales: tuple[float, ...] = DEFAULT_SCALES, fpr: float = DEFAULT_FPR,
    formats: tuple[MarkFormat, ...] | None = None,
) -> float:
    """Score threshold giving false-positive rate <= ``fpr`` by the Bonferroni bound.

    The hypotheses are every circular shift at every scale for every key and every distinct
    detection configuration of ``formats`` (default: the registered formats); on an unmarked
    image each normalised score is approximately N(0, 1).
    """
    groups = readers(formats)
    n_hyp = max(1, n_keys) * sum(period_for(s, g[0]) ** 2 for g in groups for s in scales)
    return float(norm.isf(fpr / n_hyp))


def _to_float_slices(image: NDArray | list[NDArray] | tuple[NDArray, ...]
                     ) -> list[NDArray[np.float32]]:
    if isinstance(image, (list, tuple)):  # slices of a series, of any sizes: pooled
        return [x for part in image for x in _to_float_slices(part)]
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4:
        arr = arr[..., :3].astype(np.float32).mean(axis=-1)  # RGB(A) rendering -> grey
    if arr.ndim == 2:
        return [arr.astype(np.float32)]
    if arr.ndim == 3:
        return [s.astype(np.float32) for s in arr]
    raise ValueError(f"expected a 2-D or 3-D image, got shape {arr.shape}")


def whiten(x: NDArray[np.floating], fmt: MarkFormat = CURRENT_FORMAT) -> NDArray[np.float32]:
    """High-pass residual r (image minus a Gaussian low-pass, sigma ``fmt.hp_sigma``), as a
    clipped local z-score r / s times the weight min(pix_cap, (s_ref / s)^(pix_power - 1))
    (s: local RMS over local_size^2, s_ref its median): r / s^2 up to a constant for the
    shipped format, the inverse-variance weight (invariant to a*x + b, a > 0).

    Flat areas (e.g. clipped by a display window) give exactly 0: a local energy below
    ``fmt.flat_fraction`` of the image maximum is treated as flat, so float rounding is never
    amplified.
    """
    x = np.asarray(x, dtype=np.float32)
    r = x - ndimage.gaussian_filter(x, fmt.hp_sigma, mode="reflect", truncate=3.0)
    return normalise_residual(r, fmt)


def normalise_residual(r: NDArray[np.float32], fmt: MarkFormat = CURRENT_FORMAT,
                       energy: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
    """Local z-score and inverse-variance weight of a host residual ``r`` (see
    :func:`whiten`); ``energy`` overrides the local mean square of ``r`` (bench variants)."""
    e = (ndimage.uniform_filter(r * r, fmt.local_size, mode="reflect")
         if energy is None else energy)
    s = np.sqrt(np.maximum(e, 0.0))
    smax = float(s.max()) if s.size else 0.0
    if smax <= 0.0:
        return np.zeros_like(r)
    active = s > fmt.flat_fraction * smax
    med = float(np.median(s[active]))
    eps = np.float32(0.05 * med)
    u = np.clip(r / (s + eps), -fmt.clip_z, fmt.clip_z)
    if fmt.pix_power != 1.0:  # extra weight (s_ref / s)^(p - 1), at most pix_cap: quiet
        sref = np.float32(med) + eps  # areas, where the mark dominates the host, count more
        u *= np.minimum(np.float32(fmt.pix_cap),
                        (sref / (s + eps)) ** np.float32(fmt.pix_power - 1.0))
    u[~active] = 0.0
    return u.astype(np.float32)


def fold(u: NDArray[np.floating], period: int) -> NDArray[np.float64]:
    """Sum ``u`` modulo ``period`` in both axes: (period, period)."""
    ny, nx = u.shape
    py, px = -ny % period, -nx % period
    if py or px:
        u = np.pad(u, ((0, py), (0, px)))
    return u.reshape(u.shape[0] // period, period, u.shape[1] // period, period).sum(
        axis=(0, 2), dtype=np.float64
    )


def period_for(scale: float, fmt: MarkFormat = CURRENT_FORMAT) -> int:
    """Fold period for a hypothesised resize factor (the tile stretched by ``scale``)."""
    period = fmt.tile * scale
    min_period = 2 * (max_component(fmt) + 1)  # every bin below the fold's Nyquist frequency
    if abs(period - round(period)) > 1e-9 or round(period) < min_period:
        raise ValueError(f"scale {scale} must be a multiple of 1/{fmt.tile} and "
                         f">= {min_period / fmt.tile}")
    return round(period)


def folded_phase(
    whitened: list[NDArray[np.floating]], period: int | None = None,
    fmt: MarkFormat = CURRENT_FORMAT,
) -> NDArray[np.complex128]:
    """Weighted Fourier transform of the folded, whitened slices: (period, period) complex.

    A resize by ``s`` stretches the tile to period ``tile * s`` while each bin keeps its
    index (cycles per period), so folding at that period reads the same bins: no resampling.

    Each bin G_k is divided by an estimate of the host power at k (the mean |G|^2 of its
    ``spec_nbhd`` x ``spec_nbhd`` neighbouring bins, the bin itself excluded), so the
    correlation weighs each bin by its signal-to-noise ratio (the matched filter for a mark
    of equal amplitude in every bin in Gaussian host noise); the weight of any bin is capped
    at ``weight_cap`` x the RMS weight of the band so that no single bin dominates the sum.
    The weights depend only on the magnitudes, which for an unmarked image carry no
    information on the phases, so the correlation's null distribution stays centred (the
    scores are normalised by their exact conditional standard deviation).
    """
    period = period or fmt.tile
    acc = np.zeros((period, period))
    for u in whitened:
        acc += fold(u, period)
    spec = np.fft.fft2(acc)
    mag = np.abs(spec)
    p = mag * mag
    k = fmt.spec_nbhd
    host = (ndimage.uniform_filter(p, k, mode="wrap") * (k * k) - p) / (k * k - 1)
    pos = host > 0
    w = np.where(pos, 1.0 / np.where(pos, host, 1.0), 0.0)
    g = spec * w
    a = np.abs(g)
    band = _band_mask(period, fmt)
    rms = float(np.sqrt(np.mean(a[band] ** 2))) if band.any() else 0.0
    if rms <= 0.0:
        return np.zeros_like(spec)
    cap = fmt.weight_cap * rms
    g = np.where(a > cap, g * (cap / np.where(a > 0, a, 1.0)), g)
    return g / rms


def _band_mask(period: int, fmt: MarkFormat) -> NDArray[np.bool_]:
    b = bins(fmt)
    m = np.zeros((period, period), dtype=bool)
    m[b[:, 0] % period, b[:, 1] % period] = True
    m[(-b[:, 0]) % period, (-b[:, 1]) % period] = True
    return m


def _sync_scores(g: NDArray[np.complex128], key: WatermarkKey,
                 fmt: MarkFormat = CURRENT_FORMAT) -> NDArray[np.float64]:
    """Correlation with the sync template at every circular shift, standardised: the sum
    over the template's bins of |g_k| cos(theta_k) has, for independent uniform phases,
    variance sum |g_k|^2 / 2 (per half-plane bin), whatever the weights."""
    period = g.shape[0]
    ref = sync_reference(key, period, fmt)
    c = np.real(np.fft.ifft2(g * np.conj(ref))) * (period * period)
    var = float(np.sum(np.abs(g[ref != 0]) ** 2))
    if var <= 0.0:
        return np.zeros(g.shape)
    return c / np.sqrt(var)


def soft_bits_at(
    g: NDArray[np.complex128], key: WatermarkKey, shifts: NDArray[np.int64],
    fmt: MarkFormat = CURRENT_FORMAT,
) -> NDArray[np.float64]:
    """Soft coded bits at each of ``shifts`` (K, 2): (K, CODED_BITS).

    Per coded bit: the sum over its bins of Re(phase x conj(reference)) after undoing the
    circular shift (multiply by exp(+2 pi i k.s / P)).
    """
    lay = layout(key, fmt)
    period = g.shape[0]
    ky, kx = lay.pay_bins[..., 0], lay.pay_bins[..., 1]  # (bits, bins)
    base = g[ky % period, kx % period] * np.exp(-1j * lay.pay_phase)
    phase = (ky[None] * shifts[:, 0, None, None] + kx[None] * shifts[:, 1, None, None]) / period
    return np.real(base[None] * np.exp(2j * np.pi * phase)).sum(axis=2)


def soft_bits(
    g: NDArray[np.complex128], key: WatermarkKey, shift: tuple[int, int],
    fmt: MarkFormat = CURRENT_FORMAT,
) -> NDArray[np.float64]:
    """Soft coded bits at one shift: (CODED_BITS,)."""
    return soft_bits_at(g, key, np.array([shift], dtype=np.int64), fmt)[0]


@functools.lru_cache(maxsize=1)
def _abs_table() -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """f(r) = E|cos a + r cos b| for a, b independent uniform, r in [0, 1] (quadrature)."""
    n = 720
    t = (np.arange(n) + 0.5) * (2.0 * np.pi / n)
    ca, cb = np.cos(t)[:, None], np.cos(t)[None, :]
    r = np.linspace(0.0, 1.0, 101)
    f = np.array([np.mean(np.abs(ca + ri * cb)) for ri in r])
    return r, f


def payload_energy(
    soft: NDArray[np.float64], amp: NDArray[np.float64] | None = None
) -> NDArray[np.float64]:
    """Non-coherent payload statistic: standardised sum of |soft bit| (last axis).

    On an unmarked image each soft bit is a1 cos(a) + a2 cos(b) (a1, a2: the weights of the
    bit's two bins, ``amp`` (..., bits, 2); 1 when phase-only) with independent uniform
    phases; its null mean is max(a1, a2) f(min / max) with f tabulated by quadrature
    (f(1) = E|cos a + cos b| = 0.81056) and its variance (a1^2 + a2^2) / 2 - mean^2, so the
    statistic is a standardised sum of bounded independent terms (approximately N(0, 1)).
    """
    n = soft.shape[-1]
    if amp is None:
        return (np.abs(soft).sum(axis=-1) - n * _ABS_MEAN) / np.sqrt(n * _ABS_VAR)
    if amp.shape[-1] == 1:  # one bin per bit: E|a cos| = 2a / pi
        hi, lo = amp[..., 0], np.zeros_like(amp[..., 0])
    elif amp.shape[-1] == 2:
        hi, lo = amp.max(axis=-1), amp.min(axis=-1)
    else:
        raise ValueError("payload_energy supports 1 or 2 bins per coded bit")
    r_tab, f_tab = _abs_table()
    ratio = np.where(hi > 0, lo / np.where(hi > 0, hi, 1.0), 0.0)
    mean = hi * np.interp(ratio, r_tab, f_tab)
    var = np.maximum((hi * hi + lo * lo) / 2.0 - mean * mean, 0.0)
    tot = var.sum(axis=-1)
    return np.where(
        tot > 0,
        (np.abs(soft).sum(axis=-1) - mean.sum(axis=-1)) / np.sqrt(np.where(tot > 0, tot, 1.0)),
        0.0,
    )


def _pay_amp(g: NDArray[np.complex128], key: WatermarkKey,
             fmt: MarkFormat) -> NDArray[np.float64]:
    lay = layout(key, fmt)
    period = g.shape[0]
    return np.abs(g[lay.pay_bins[..., 0] % period, lay.pay_bins[..., 1] % period])


def _hypotheses(
    g: NDArray[np.complex128], key: WatermarkKey, fmt: MarkFormat = CURRENT_FORMAT,
) -> tuple[float, float, tuple[int, int], NDArray[np.float64]]:
    """Best (combined score, sync score, shift, soft bits) for one fold and one key.

    The combined score (sync + w x payload energy) / sqrt(1 + w^2) (w = ``energy_weight``) is
    evaluated at the ``top_k`` shifts with the highest sync score; its maximum over that
    subset is at most its maximum over all shifts, so the Bonferroni bound over all shifts
    still holds.
    """
    zs = _sync_scores(g, key, fmt).ravel()
    top = np.argpartition(zs, -fmt.top_k)[-fmt.top_k:]
    shifts = np.stack(np.unravel_index(top, g.shape), axis=1).astype(np.int64)
    soft = soft_bits_at(g, key, shifts, fmt)
    energy = payload_energy(soft, _pay_amp(g, key, fmt))
    w = fmt.energy_weight
    comb = (zs[top] + w * energy) / np.sqrt(1.0 + w**2)
    i = int(np.argmax(comb))
    return float(comb[i]), float(zs[top[i]]), (int(shifts[i, 0]), int(shifts[i, 1])), soft[i]


def detect(image: NDArray | list[NDArray] | tuple[NDArray, ...],
           keys: list[WatermarkKey] | WatermarkKey, *,
           scales: tuple[float, ...] = DEFAULT_SCALES, fpr: float = DEFAULT_FPR,
           formats: tuple[MarkFormat, ...] | None = None) -> Detection:
    """Look for the mark of any of ``keys``.

    Parameters
    ----------
    image
        Stored values or any rendering: 2-D, 3-D (frames, rows, columns; frames are pooled,
        so all frames must share one geometry) or (rows, columns, 3|4) RGB(A); any dtype;
        or a list of such images (the slices of a series, any sizes), pooled: every slice
        of an output series carries the same mark, so the series is judged as one image.
    keys
        Keys to try (key rotation); the best-scoring one is reported.
    scales
        Resize factors to test (1 = original size, 2 = image was enlarged 2x, 0.5 = shrunk),
        multiples of 1/64 that are >= 0.5.
    fpr
        Target false-positive rate on unmarked images, split over all hypotheses.
    formats
        Mark formats to read (default: every registered format, so old marks are found;
        formats that read alike are read once).

    Returns
    -------
    Detection
    """
    if isinstance(keys, WatermarkKey):
        keys = [keys]
    if not keys:
        raise ValueError("no watermark keys given")
    slices = _to_float_slices(image)
    thr = threshold_for(len(keys), scales, fpr, formats)
    best: Detection | None = None
    for group in readers(formats):
        fmt = group[0]
        det = detect_whitened([whiten(x, fmt) for x in slices], keys, scales=scales,
                              threshold=thr, fmt=fmt)
        if best is None or _rank(det) > _rank(best):
            best = det
    assert best is not None
    if not best.marked:
        best = Detection(marked=False, score=best.score, threshold=thr, key_id=None, payload=None,
                         scale=best.scale, shift=best.shift, sync_score=best.sync_score,
                         soft_bits=best.soft_bits)
    return best


def detect_whitened(whitened: list[NDArray[np.floating]], keys: list[WatermarkKey], *,
                    scales: tuple[float, ...], threshold: float,
                    fmt: MarkFormat = CURRENT_FORMAT) -> Detection:
    """The detector after whitening, for one format: fold at each scale, score every key,
    decode the payload where the score passes the format's decode gate. ``detect`` calls
    it per detection configuration; bench/ calls it with experimental whitening."""
    best: Detection | None = None
    for scale in scales:
        g = folded_phase(whitened, period_for(scale, fmt), fmt)
        for key in keys:
            score, sync, shift, soft = _hypotheses(g, key, fmt)
            payload = None
            errors = None
            if score >= fmt.decode_gate:
                info = ecc.viterbi_decode(soft)
                cand, ok = _check_info(key, info, fmt)
                if ok:
                    payload = cand
                    cw = ecc.conv_encode(info)
                    errors = int(np.sum((soft < 0).astype(np.uint8) != cw))
            det = Detection(
                marked=bool(score >= threshold or payload is not None), score=score,
                threshold=threshold, key_id=key.key_id, payload=payload, bit_errors=errors,
                scale=scale, shift=shift, sync_score=sync, soft_bits=soft,
                format_version=fmt.version,
            )
            if best is None or _rank(det) > _rank(best):
                best = det
    assert best is not None
    return best


def candidate_bits(image: NDArray, key: WatermarkKey, scale: float = 1.0,
                   fmt: MarkFormat = CURRENT_FORMAT) -> NDArray[np.uint8]:
    """Viterbi output (64 info bits, descrambled) at the best shift, whether or not the CRC
    matches; used to check that unmarked images decode to uniform bits."""
    whitened = [whiten(x, fmt) for x in _to_float_slices(image)]
    g = folded_phase(whitened, period_for(scale, fmt), fmt)
    _, _, _, soft = _hypotheses(g, key, fmt)
    return ecc.viterbi_decode(soft) ^ layout(key, fmt).scramble


def _rank(d: Detection) -> tuple[int, float]:
    return (1 if d.payload is not None else 0, d.score)
