"""Engine (torch/MONAI) runtime settings."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from config.sections import Section


class EngineSettings(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(default=0, ge=0, description="torch intra-op threads; 0 = all cores")
    batch_slices: int | None = Field(
        default=None,
        ge=1,
        description="slices per forward pass; unset: on the CPU about one 512 x 512 slice of "
        "pixels per batch (1 at 512 px, 4 at 256 px: measured faster per slice than larger "
        "batches, bench/results/engine_speed.md), 8 on CUDA",
    )
    bf16_on_gpu: bool = True
    workers: int = Field(default=1, ge=1, description="local engine worker processes/threads")
