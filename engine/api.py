"""The engine's public contract with the node: arrays + geometry + intensity meaning in,
arrays + a provenance record out. No DICOM here (the node converts to and from DICOM).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np


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
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    intensity: Intensity

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise ValueError(f"Volume.data must be 3-D (z, y, x), got shape {self.data.shape}")
        if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
            raise ValueError(f"Volume.spacing must be 3 positive values in mm, got {self.spacing}")
        if not isinstance(self.intensity, Intensity):
            object.__setattr__(self, "intensity", Intensity(self.intensity))


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


def run_task(
    task: str,
    volume: Volume,
    *,
    model: Any,
    params: dict[str, Any] | None,
    seed: int,
    device: str | None = None,
    options: Any = None,
) -> TaskResult:
    """Run a registered engine task on ``volume``.

    Parameters
    ----------
    task : str
        ``"ct_denoise"``, ``"mr_denoise"``, ``"ct_to_mr"`` or ``"augment"``
        (``engine.tasks.TASKS`` holds each input contract).
    volume : Volume
        the input slice stack in physical intensity (HU for CT).
    model : engine.models.LoadedModel
        from :func:`engine.models.load_model` (weights verified by the model gate).
    params : dict
        task parameters; missing ones take the task / model defaults, unknown ones are
        refused. The filled-in parameters are recorded in the provenance.
    seed : int
        all randomness is drawn from this seed (same seed, same input -> same output).
    device : str, optional
        ``"cpu"``, ``"cuda"`` or ``"auto"``; default from ``options.device`` or ``"auto"``.
    options : config.sections.engine.EngineSettings, optional
        ``batch_slices``, ``bf16_on_gpu``, ``threads`` (any object with those attributes).

    Raises
    ------
    engine.tasks.TaskInputError
        the volume, parameters or model do not satisfy the task's contract.
    """
    from engine.tasks import execute

    return execute(
        task, volume, model=model, params=params, seed=seed, device=device, options=options
    )


def load_model(config: dict[str, Any], weights: bytes, weights_sha256: str) -> Any:
    """Re-export of :func:`engine.models.load_model` (safetensors bytes, digest re-checked)."""
    from engine.models import load_model as _load

    return _load(config, weights, weights_sha256)
