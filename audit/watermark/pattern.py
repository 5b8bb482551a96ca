"""The keyed mark: a band-limited periodic tile defined in the Fourier domain.

The tile is ``TILE x TILE`` pixels and repeats over the image with its origin at pixel
(0, 0), so a crop or a shift only moves the pattern circularly inside one period; the
detector folds the image modulo the period and finds the shift by FFT cross-correlation
(no block grid to re-align). Each half-plane frequency bin of the tile with radius in
[R_LO, R_HI] (in cycles per tile) carries one unit phasor with a keyed random phase:

* SYNC bins carry the phase alone: a known template used to find the shift (and scale);
* PAYLOAD bins come in keyed groups of ``BINS_PER_BIT``, one group per coded bit, and carry
  the phase multiplied by +-1.

Frequencies are capped at R_HI / TILE = 0.25 cycles per pixel so the mark survives 2x
down-sampling and sits where JPEG's quantisation steps are still small. Bins on the axes
(row / column artefacts) and on the 8-pixel JPEG block grid are not used.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from audit.watermark.ecc import CODED_BITS
from audit.watermark.key import WatermarkKey

TILE = 64
R_LO = 2.5
R_HI = 16.0
BINS_PER_BIT = 2
SYNC_ENERGY = 0.50  # fraction of the mark's energy in the sync template (0.30 before 2026-11-22)
TILT = 0.0  # spectral tilt exponent; 1.0 measured worse on phantom CT (docs/watermark.md)
TILT_JPEG = 0.0  # amplitude ~ (JPEG luminance quantisation step at the bin)**-TILT_JPEG (0: flat)

# ITU-T T.81 Annex K luminance quantisation table (rows: vertical DCT frequency v, columns: u).
JPEG_LUMA = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=np.float64)


def jpeg_step(ky: NDArray, kx: NDArray) -> NDArray[np.float64]:
    """JPEG luminance quantisation step (relative) at tile bin (ky, kx): the bin's frequency
    k / TILE cycles / pixel is DCT index 16 k / TILE of an 8-point block; bilinear in log Q."""
    v = np.abs(np.asarray(ky, dtype=np.float64)) * 16.0 / TILE
    u = np.abs(np.asarray(kx, dtype=np.float64)) * 16.0 / TILE
    v0, u0 = np.minimum(np.floor(v).astype(int), 6), np.minimum(np.floor(u).astype(int), 6)
    fv, fu = v - v0, u - u0
    lq = np.log(JPEG_LUMA)
    val = ((1 - fv) * (1 - fu) * lq[v0, u0] + fv * (1 - fu) * lq[v0 + 1, u0]
           + (1 - fv) * fu * lq[v0, u0 + 1] + fv * fu * lq[v0 + 1, u0 + 1])
    return np.exp(val)


def _half_plane_bins() -> NDArray[np.int64]:
    """Usable (ky, kx) bins with kx > 0 (their conjugates fill the other half)."""
    out = []
    h = TILE // 2
    for ky in range(-h + 1, h):
        for kx in range(1, h):
            r = float(np.hypot(ky, kx))
            if not R_LO <= r <= R_HI or ky == 0:
                continue
            if ky % (TILE // 8) == 0 and kx % (TILE // 8) == 0:
                continue  # JPEG 8x8 block grid harmonics
            out.append((ky, kx))
    return np.array(out, dtype=np.int64)


BINS = _half_plane_bins()
N_BINS = len(BINS)
MAX_COMPONENT = int(np.abs(BINS).max())  # 15: folds down to 32 px keep every bin
N_PAYLOAD_BINS = CODED_BITS * BINS_PER_BIT
N_SYNC_BINS = N_BINS - N_PAYLOAD_BINS
assert N_SYNC_BINS >= 64, "band too narrow for the payload"


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


def _spectrum_to_tile(spec_half: dict[tuple[int, int], complex]) -> NDArray[np.float64]:
    full = np.zeros((TILE, TILE), dtype=np.complex128)
    for (ky, kx), v in spec_half.items():
        full[ky % TILE, kx % TILE] += v
        full[(-ky) % TILE, (-kx) % TILE] += np.conj(v)
    return np.real(np.fft.ifft2(full))


@functools.lru_cache(maxsize=32)
def _layout_cached(secret: bytes, key_id: int) -> Layout:
    key = WatermarkKey(secret, key_id)
    rng = np.random.default_rng(key.seed("layout"))
    perm = rng.permutation(N_BINS)
    phases = rng.uniform(0.0, 2.0 * np.pi, N_BINS)
    pay_idx = perm[:N_PAYLOAD_BINS].reshape(CODED_BITS, BINS_PER_BIT)
    sync_idx = np.sort(perm[N_PAYLOAD_BINS:])
    scramble = np.frombuffer(key.derive("scramble", 8), dtype=np.uint8)
    scramble = np.unpackbits(scramble)[:64]

    # Amplitudes so that the sync template holds SYNC_ENERGY of the mark's energy.
    a_sync = np.sqrt(SYNC_ENERGY / N_SYNC_BINS)
    a_pay = np.sqrt((1.0 - SYNC_ENERGY) / N_PAYLOAD_BINS)
    # Spectral tilt: amplitude ~ radius**-TILT (more energy where JPEG and resizing keep it),
    # normalised to unit mean power within each group.
    radius = np.hypot(BINS[:, 0], BINS[:, 1]).astype(np.float64)
    tilt = radius ** (-TILT)
    if TILT_JPEG:
        tilt = tilt * jpeg_step(BINS[:, 0], BINS[:, 1]) ** (-TILT_JPEG)
    tilt_sync = tilt / np.sqrt(np.mean(tilt[sync_idx] ** 2))
    tilt_pay = tilt / np.sqrt(np.mean(tilt[pay_idx.ravel()] ** 2))
    sync_tile = _spectrum_to_tile(
        {
            (int(BINS[i, 0]), int(BINS[i, 1])): a_sync * tilt_sync[i] * np.exp(1j * phases[i])
            for i in sync_idx
        }
    )
    pay_tiles = np.stack(
        [
            _spectrum_to_tile(
                {
                    (int(BINS[i, 0]), int(BINS[i, 1])): a_pay * tilt_pay[i] * np.exp(1j * phases[i])
                    for i in group
                }
            )
            for group in pay_idx
        ]
    )
    # Scale so that any +-1 payload gives a tile of unit standard deviation (bins are
    # orthogonal, so the energy does not depend on the payload).
    norm = np.sqrt(np.mean(sync_tile**2) + np.sum(np.mean(pay_tiles**2, axis=(1, 2))))
    sync_ref = np.zeros((TILE, TILE), dtype=np.complex128)
    for i in sync_idx:
        ky, kx = int(BINS[i, 0]), int(BINS[i, 1])
        sync_ref[ky % TILE, kx % TILE] = np.exp(1j * phases[i])
        sync_ref[(-ky) % TILE, (-kx) % TILE] = np.exp(-1j * phases[i])
    return Layout(
        sync_bins=BINS[sync_idx],
        sync_phase=phases[sync_idx],
        pay_bins=BINS[pay_idx],
        pay_phase=phases[pay_idx],
        scramble=scramble,
        sync_ref=sync_ref,
        sync_tile=sync_tile / norm,
        pay_tiles=pay_tiles / norm,
    )


def layout(key: WatermarkKey) -> Layout:
    """The keyed layout of ``key`` (cached)."""
    return _layout_cached(bytes(key.secret), key.key_id)


@functools.lru_cache(maxsize=64)
def _sync_reference_cached(secret: bytes, key_id: int, period: int) -> NDArray[np.complex128]:
    lay = _layout_cached(secret, key_id)
    ref = np.zeros((period, period), dtype=np.complex128)
    ky, kx = lay.sync_bins[:, 0], lay.sync_bins[:, 1]
    ref[ky % period, kx % period] = np.exp(1j * lay.sync_phase)
    ref[(-ky) % period, (-kx) % period] = np.exp(-1j * lay.sync_phase)
    return ref


def sync_reference(key: WatermarkKey, period: int = TILE) -> NDArray[np.complex128]:
    """Full-plane unit-magnitude sync spectrum for a fold of ``period`` pixels (cached)."""
    return _sync_reference_cached(bytes(key.secret), key.key_id, period)


def mark_tile(key: WatermarkKey, coded: NDArray[np.uint8]) -> NDArray[np.float64]:
    """Unit-variance spatial tile for a coded word (bit 0 -> +1, bit 1 -> -1)."""
    lay = layout(key)
    signs = 1.0 - 2.0 * coded.astype(np.float64)
    return lay.sync_tile + np.tensordot(signs, lay.pay_tiles, axes=1)
