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
    max_delta: int = Field(default=2, ge=1, le=64, description="max change in stored units")
    required: bool = True
