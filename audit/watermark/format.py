"""Mark formats: every parameter of how a mark is laid out, embedded and read, frozen and
versioned.

A :class:`MarkFormat` is passed explicitly to the embedder and the detector (no module-level
switches). Its ``version`` is recorded with every mark (the pipeline's provenance and the
``output.created`` ledger event), and :data:`FORMATS` keeps every version ever shipped so that
a detector can still read old marks: :func:`audit.watermark.detect` tries the detection
configurations of all registered formats (formats that share the same layout and detector
parameters are read in one pass, so the number of hypotheses, and with it the threshold, only
grows when a format really reads differently).

Experiments (other host predictors, masks, spectral tilts ...) live in ``bench/``; a new
shipped format gets a new version here and never changes an old one.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MarkFormat:
    """One version of the mark.

    Layout (keyed bins of a ``tile`` x ``tile`` Fourier-domain tile): half-plane bins with
    radius ``r_lo`` .. ``r_hi`` cycles per tile, ``bins_per_bit`` bins per coded bit, the rest
    sync bins holding ``sync_energy`` of the mark's energy. Embedding: ``strength`` x max_delta
    x the unit-variance tile, rounded and clipped to +-max_delta. Detection: Gaussian high-pass
    host (``hp_sigma``), local RMS over ``local_size`` pixels, local z-score clipped at
    ``clip_z``, pixel weight (s_ref / s)^(``pix_power`` - 1) capped at ``pix_cap``; per-bin SNR
    weighting over ``spec_nbhd`` x ``spec_nbhd`` neighbours capped at ``weight_cap`` x the band
    RMS; score = (sync + ``energy_weight`` x payload energy) / sqrt(1 + energy_weight^2) at the
    ``top_k`` best sync shifts; payload accepted when its CRC matches at a score >=
    ``decode_gate``.
    """

    version: int
    # layout
    tile: int = 64
    r_lo: float = 2.5
    r_hi: float = 16.0
    bins_per_bit: int = 2
    # embedding
    sync_energy: float = 0.50
    strength: float = 2.0
    # detection
    hp_sigma: float = 3.0
    local_size: int = 7
    clip_z: float = 4.0
    flat_fraction: float = 1e-4
    pix_power: float = 2.0
    pix_cap: float = 3.0
    spec_nbhd: int = 5
    weight_cap: float = 4.0
    energy_weight: float = 0.3
    top_k: int = 16
    decode_gate: float = 4.0

    def __post_init__(self) -> None:
        if self.version < 1:
            raise ValueError("format version must be >= 1")
        if self.tile % 8 or self.tile < 16:
            raise ValueError("tile must be a multiple of 8, at least 16")
        if not 0 < self.r_lo < self.r_hi < self.tile // 2:
            raise ValueError("need 0 < r_lo < r_hi < tile / 2")
        if self.bins_per_bit not in (1, 2):
            raise ValueError("bins_per_bit must be 1 or 2")
        if not 0.0 < self.sync_energy < 1.0:
            raise ValueError("sync_energy must be in (0, 1)")
        if self.strength <= 0 or self.energy_weight < 0 or self.top_k < 1:
            raise ValueError("strength must be > 0, energy_weight >= 0, top_k >= 1")

    @property
    def layout_key(self) -> tuple[int, float, float, int, float]:
        """The parameters that fix the keyed layout (bins, phases, tiles)."""
        return (self.tile, self.r_lo, self.r_hi, self.bins_per_bit, self.sync_energy)

    @property
    def reader_key(self) -> tuple[float | int, ...]:
        """The parameters that change what the detector computes: formats with the same
        reader key are read in one pass (the sync energy and the strength only scale the
        embedded amplitudes, which the detector does not assume)."""
        return (self.tile, self.r_lo, self.r_hi, self.bins_per_bit, self.hp_sigma,
                self.local_size, self.clip_z, self.flat_fraction, self.pix_power, self.pix_cap,
                self.spec_nbhd, self.weight_cap, self.energy_weight, self.top_k,
                self.decode_gate)


#: Version 1: the first mark (until 2026-11-22): sync template 30 % of the energy, strength 1.
FORMAT_V1 = MarkFormat(version=1, sync_energy=0.30, strength=1.0)
#: Version 2: sync 50 %, strength 2 (same keyed layout as version 1); read with the SNR-weighted,
#: inverse-variance detector (payload energy weight 0.3). The shipped format.
FORMAT_V2 = MarkFormat(version=2)

#: Every format ever shipped, by version (never remove or change an entry).
FORMATS: dict[int, MarkFormat] = {f.version: f for f in (FORMAT_V1, FORMAT_V2)}
#: The format new marks are made with.
CURRENT_FORMAT = FORMAT_V2


def format_for(version: int) -> MarkFormat:
    """The registered format ``version`` (ValueError when unknown)."""
    try:
        return FORMATS[int(version)]
    except KeyError:
        raise ValueError(f"unknown watermark format version {version!r} "
                         f"(known: {sorted(FORMATS)})") from None


def readers(formats: tuple[MarkFormat, ...] | None = None) -> list[tuple[MarkFormat, ...]]:
    """``formats`` (default: every registered one) grouped by reader key, newest first."""
    fmts = sorted(formats or tuple(FORMATS.values()), key=lambda f: -f.version)
    groups: dict[tuple[float | int, ...], list[MarkFormat]] = {}
    for f in fmts:
        groups.setdefault(f.reader_key, []).append(f)
    return [tuple(g) for g in groups.values()]
