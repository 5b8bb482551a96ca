"""The engine's public contract with the node: the shared types (from :mod:`engine.types`)
and the facade that runs a task and loads a model. No DICOM here (the node converts to and
from DICOM). Engine modules import the types from :mod:`engine.types`, never this facade, so
the facade can import them back without a cycle.
"""
from __future__ import annotations

from typing import Any

from engine.types import Intensity, Provenance, TaskName, TaskResult, Volume

__all__ = [
    "Intensity", "Provenance", "TaskName", "TaskResult", "Volume", "load_model", "run_task",
]


def run_task(
    task: TaskName | str,
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
    task : TaskName or str
        a :class:`engine.types.TaskName` or its value (``engine.tasks.TASKS`` holds each
        input contract); an unknown name raises ``TaskInputError``.
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
