"""Invisible-watermark settings (application tier)."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from config.sections import Section


class WatermarkSettings(Section):
    key_file: Path | None = Field(
        default=None, description="secret key; empty = <data_dir>/keys/watermark.key"
    )
    extra_key_files: list[Path] = Field(
        default_factory=list, description="older keys tried by the detector"
    )
    hu_max_change: float = Field(
        default=4.0, ge=1.0, le=64.0,
        description="HU-calibrated CT outputs: max |change| of the mark in HU",
    )
    other_max_delta: int = Field(
        default=2, ge=1, le=64,
        description="other outputs (MR, CR, no physical unit): max |change| in stored units",
    )
    min_psnr_db: float = Field(
        default=50.0, ge=30.0, le=100.0,
        description="other outputs: the mark keeps PSNR at least this (dB, stored range)",
    )
    other_noise_fraction: float = Field(
        default=0.5, ge=0.0, le=0.5,
        description="other outputs: where other_max_delta cannot carry a readable mark, the "
                    "bound may rise up to this x the image noise sd (0 = never: such outputs "
                    "stay unverified and are not dispatched; the PSNR floor always holds)",
    )
    required: bool = True
