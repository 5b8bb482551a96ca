"""Engine (torch/MONAI) runtime settings."""
from __future__ import annotations

from typing import Literal

from config.sections import Section
from pydantic import Field


class EngineSettings(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(default=0, ge=0, description="torch intra-op threads; 0 = all cores")
    batch_slices: int = Field(default=8, ge=1)
    bf16_on_gpu: bool = True
    workers: int = Field(default=1, ge=1, description="local engine worker processes/threads")
