"""Ingest limits: what one received object may cost before it is refused (C-STORE and
STOW-RS share them; node/ingest/validation.py applies them)."""
from __future__ import annotations

from pydantic import Field

from config.sections import Section

_MIB = 1024 * 1024


class IngestSettings(Section):
    max_dataset_bytes: int = Field(
        default=2048 * _MIB, ge=1024,
        description="largest data set accepted in one C-STORE / STOW-RS part (as sent)")
    max_inflated_bytes: int = Field(
        default=256 * _MIB, ge=1024,
        description="largest size a deflated data set may inflate to (PS3.5 A.5)")
    max_frame_bytes: int = Field(
        default=512 * _MIB, ge=1024,
        description="largest declared decoded frame: Rows x Columns x Samples x Bits")
    max_pixel_bytes: int = Field(
        default=4096 * _MIB, ge=1024,
        description="largest declared decoded image: frame size x Number of Frames")
