"""The keyed mark: a band-limited periodic tile defined in the Fourier domain.

All parameters come from a :class:`audit.watermark.format.MarkFormat`. The tile is
``tile x tile`` pixels and repeats over the image with its origin at pixel
(0, 0), so a crop or a shift only moves the pattern circularly inside one period; the
detector folds the image modulo the period and finds the shift by FFT cross-correlation
(no block grid to re-align). Each half-plane frequency bin of the tile with radius in
[r_lo, r_hi] (in cycles per tile) carries one unit phasor with a keyed random phase:

* SYNC bins carry the phase alone: a known template used to find the shift (and scale);
* PAYLOAD bins come in keyed groups of ``bins_per_bit``, one group per coded bit, and carry
  the phase multiplied by +-1.

Frequencies are capped at r_hi / tile = 0.25 cycles per pixel so the mark survives 2x
down-sampling and sits where JPEG's quantisation steps are still small. Bins on the axes
(row / column artefacts) and on the 8-pixel JPEG block grid are not used.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from audit.watermark.ecc import CODED_BITS
from audit.watermark.format import CURRENT_FORMAT, MarkFormat
from audit.watermark.key import WatermarkKey


@functools.lru_cache(maxsize=8)
def _bins_cached(tile: int, r_lo: float, r_hi: float) -> NDArray[np.int64]:
    out = []
    h = tile // 2
    for ky in range(-h + 1, h):
        for kx in range(1, h):
            r = float(np.hypot(ky, kx))
            if not r_lo <= r <= r_hi or ky == 0:
                continue
            if ky % (tile // 8) == 0 and kx % (tile // 8) == 0:
                continue  # JPEG 8x8 block grid harmonics
            out.append((ky, kx))
    bins = np.array(out, dtype=np.int64)
    bins.setflags(write=False)
    return bins


def bins(fmt: MarkFormat = CURRENT_FORMAT) -> NDArray[np.int64]:
    """Usable (ky, kx) bins of ``fmt`` with kx > 0 (their conjugates fill the other half)."""
    b = _bins_cached(fmt.tile, fmt.r_lo, fmt.r_hi)
    if len(b) - CODED_BITS * fmt.bins_per_bit < 64:
        raise ValueError("band too narrow for the payload")
    return b


def max_component(fmt: MarkFormat = CURRENT_FORMAT) -> int:
    """Largest |ky|, |kx| of the band (15 for the shipped format: folds down to 32 px keep
    every bin)."""
    return int(np.abs(bins(fmt)).max())


@dataclass(frozen=True)
class Layout:
    """Keyed layout of one key: bins of the sync template and of each coded bit."""

    sync_bins: NDArray[np.int64]  # (n_sync, 2) ky, kx
    sync_phase: NDArray[np.float64]  # (n_sync,)
    pay_bins: NDArray[np.int64]  # (CODED_BITS, BINS_PER_BIT, 2)
    pay_phase: NDArray[np.float64]  # (CODED_BITS, BINS_PER_BIT)
    scramble: NDArray[np.uint8]  # (INFO_BITS,) keyed XOR sequence
    sync_ref: NDArray[np.complex128]  # (TILE, TILE) full-plane unit template spectrum
    sync_tile: NDArray[np.float64]  # spatial sync tile (unit std overall mark scale)
    pay_tiles: NDArray[np.float64]  # (CODED_BITS, TILE, TILE) spatial tile per coded bit


def _spectrum_to_tile(spec_half: dict[tuple[int, int], complex], tile: int) -> NDArray[np.float64]:
    full = np.zeros((tile, tile), dtype=np.complex128)
    for (ky, kx), v in spec_half.items():
        full[ky % tile, kx % tile] += v
        full[(-ky) % tile, (-kx) % tile] += np.conj(v)
    return np.real(np.fft.ifft2(full))


@functools.lru_cache(maxsize=32)
def _layout_cached(secret: bytes, key_id: int, fmt: MarkFormat) -> Layout:
    key = WatermarkKey(secret, key_id)
    tile = fmt.tile
    all_bins = bins(fmt)
    n_bins = len(all_bins)
    n_pay = CODED_BITS * fmt.bins_per_bit
    rng = np.random.default_rng(key.seed("layout"))
    perm = rng.permutation(n_bins)
    phases = rng.uniform(0.0, 2.0 * np.pi, n_bins)
    pay_idx = perm[:n_pay].reshape(CODED_BITS, fmt.bins_per_bit)
    sync_idx = np.sort(perm[n_pay:])
    scramble = np.frombuffer(key.derive("scramble", 8), dtype=np.uint8)
    scramble = np.unpackbits(scramble)[:64]

    # Amplitudes so that the sync template holds fmt.sync_energy of the mark's energy.
    a_sync = np.sqrt(fmt.sync_energy / len(sync_idx))
    a_pay = np.sqrt((1.0 - fmt.sync_energy) / n_pay)
    sync_tile = _spectrum_to_tile(
        {(int(all_bins[i, 0]), int(all_bins[i, 1])): a_sync * np.exp(1j * phases[i])
         for i in sync_idx}, tile)
    pay_tiles = np.stack(
        [
            _spectrum_to_tile(
                {(int(all_bins[i, 0]), int(all_bins[i, 1])): a_pay * np.exp(1j * phases[i])
                 for i in group}, tile)
            for group in pay_idx
        ]
    )
    # Scale so that any +-1 payload gives a tile of unit standard deviation (bins are
    # orthogonal, so the energy does not depend on the payload).
    norm = np.sqrt(np.mean(sync_tile**2) + np.sum(np.mean(pay_tiles**2, axis=(1, 2))))
    sync_ref = np.zeros((tile, tile), dtype=np.complex128)
    for i in sync_idx:
        ky, kx = int(all_bins[i, 0]), int(all_bins[i, 1])
        sync_ref[ky % tile, kx % tile] = np.exp(1j * phases[i])
        sync_ref[(-ky) % tile, (-kx) % tile] = np.exp(-1j * phases[i])
    return Layout(
        sync_bins=all_bins[sync_idx],
        sync_phase=phases[sync_idx],
        pay_bins=all_bins[pay_idx],
        pay_phase=phases[pay_idx],
        scramble=scramble,
        sync_ref=sync_ref,
        sync_tile=sync_tile / norm,
        pay_tiles=pay_tiles / norm,
    )


def layout(key: WatermarkKey, fmt: MarkFormat = CURRENT_FORMAT) -> Layout:
    """The keyed layout of ``key`` under ``fmt`` (cached)."""
    return _layout_cached(bytes(key.secret), key.key_id, fmt)


@functools.lru_cache(maxsize=64)
def _sync_reference_cached(secret: bytes, key_id: int, fmt: MarkFormat,
                           period: int) -> NDArray[np.complex128]:
    lay = _layout_cached(secret, key_id, fmt)
    ref = np.zeros((period, period), dtype=np.complex128)
    ky, kx = lay.sync_bins[:, 0], lay.sync_bins[:, 1]
    ref[ky % period, kx % period] = np.exp(1j * lay.sync_phase)
    ref[(-ky) % period, (-kx) % period] = np.exp(-1j * lay.sync_phase)
    return ref


def sync_reference(key: WatermarkKey, period: int | None = None,
                   fmt: MarkFormat = CURRENT_FORMAT) -> NDArray[np.complex128]:
    """Full-plane unit-magnitude sync spectrum for a fold of ``period`` pixels (default: the
    tile) (cached)."""
    return _sync_reference_cached(bytes(key.secret), key.key_id, fmt, period or fmt.tile)


def mark_tile(key: WatermarkKey, coded: NDArray[np.uint8],
              fmt: MarkFormat = CURRENT_FORMAT) -> NDArray[np.float64]:
    """Unit-variance spatial tile for a coded word (bit 0 -> +1, bit 1 -> -1)."""
    lay = layout(key, fmt)
    signs = 1.0 - 2.0 * coded.astype(np.float64)
    return lay.sync_tile + np.tensordot(signs, lay.pay_tiles, axes=1)
