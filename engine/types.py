"""The engine's shared types: arrays + geometry + intensity meaning in, arrays + a provenance
record out. Imported by every engine module and, through :mod:`engine.api`, by the node. No
DICOM here (the node converts to and from DICOM)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

import numpy as np

__all__ = ["Intensity", "Provenance", "TaskName", "TaskResult", "Volume"]


class TaskName(StrEnum):
    """The engine's tasks: the one list of task names (engine.tasks.TASKS is keyed by it; the
    node's rule check, the model manifests' ``task`` and the CLI use these values)."""

    CT_DENOISE = "ct_denoise"  # low-dose CT restoration, HU in / out
    MR_DENOISE = "mr_denoise"  # MR restoration of Rician noise
    CT_TO_MR = "ct_to_mr"  # CT -> T1w / T2w synthesis
    AUGMENT = "augment"  # N variants of a slice stack
    CT_SPARSE_VIEW = "ct_sparse_view"  # streak removal from sparse-view FBP, HU in / out
    MR_UNDERSAMPLED = "mr_undersampled"  # zero-filled undersampled k-space -> full


class Intensity(str, Enum):
    """What the voxel values mean."""

    HU = "HU"  # CT Hounsfield units
    MR_T1W = "MR_T1W"  # T1-weighted MR, arbitrary units
    MR_T2W = "MR_T2W"  # T2-weighted MR, arbitrary units
    MR = "MR"  # MR of unspecified weighting, arbitrary units


@dataclass(frozen=True)
class Volume:
    """A slice stack in physical intensity.

    data     float32 array (z, y, x); slices ordered along the slice normal
    spacing  voxel spacing in mm (z, y, x)
    fov      optional bool array of ``data``'s shape: True inside the field of view, False
             for padding (the node's Pixel Padding Value / Range Limit); the engine works on
             the field of view and passes the rest through (``engine.conditioning``)
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    intensity: Intensity
    fov: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise ValueError(f"Volume.data must be 3-D (z, y, x), got shape {self.data.shape}")
        if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
            raise ValueError(f"Volume.spacing must be 3 positive values in mm, got {self.spacing}")
        if not isinstance(self.intensity, Intensity):
            object.__setattr__(self, "intensity", Intensity(self.intensity))
        if self.fov is not None:
            fov = np.asarray(self.fov)
            if fov.shape != self.data.shape or fov.dtype != bool:
                raise ValueError(f"Volume.fov must be a bool array of shape {self.data.shape}, "
                                 f"got {fov.dtype} {fov.shape}")


@dataclass(frozen=True)
class Provenance:
    """What produced an output: recorded in the ledger and in the DICOM output."""

    task: str
    model_id: str
    model_version: str
    weights_sha256: str
    parameters: dict[str, Any]
    seed: int
    device: str
    steps: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskResult:
    outputs: list[Volume]  # one for restoration / synthesis, N for augmentation
    provenance: Provenance
