"""Engine runners: run one engine task on an assembled volume with a model the model gate
admitted."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.api import TaskResult, Volume
from node.pipeline.jobs import PermanentJobError

__all__ = ["EngineRunner", "GatedEngineRunner"]

#: engine runner: (task, volume, params, seed, model id or None) -> TaskResult
EngineRunner = Callable[[str, Volume, dict[str, Any], int, str | None], TaskResult]


class GatedEngineRunner:
    """Runs engine tasks with models admitted by the model gate.

    The model folder is chosen by model id (``TaskSpec.model``) or, by default, the one
    approved folder whose manifest names the task. The weights digest the gate checked is
    re-checked by ``engine.models.load_model`` and lands in the provenance.
    """

    def __init__(self, gate: Any, models_dir: Path, *, options: Any = None,
                 device: str | None = None) -> None:
        self.gate = gate
        self.models_dir = Path(models_dir)
        self.options = options
        self.device = device

    def _folder(self, task: str, model_id: str | None) -> Path:
        candidates = []
        for folder in self.gate.folders(self.models_dir):
            try:
                manifest = json.loads((folder / "manifest.json").read_text())
            except (OSError, ValueError):
                continue
            if model_id is not None and manifest.get("model_id") == model_id:
                return folder
            if model_id is None and manifest.get("task") == task:
                candidates.append(folder)
        if model_id is not None:
            raise PermanentJobError(f"no model {model_id!r} in {self.models_dir}")
        if not candidates:
            raise PermanentJobError(f"no model for task {task!r} in {self.models_dir}")
        return sorted(candidates)[-1]

    def __call__(self, task: str, volume: Volume, params: dict[str, Any], seed: int,
                 model_id: str | None) -> TaskResult:
        from engine.api import run_task
        from engine.models import load_model

        verified, base = self.gate.load_with_base(self._folder(task, model_id), self.models_dir)
        (name, weights), = verified.weights.items()
        if base is None:
            model = load_model(verified.config(), weights, verified.file_sha256[name])
        else:  # an adapter on its frozen base, both admitted by the gate
            from engine.adapters import load_adapter

            (bname, bweights), = base.weights.items()
            base_model = load_model(base.config(), bweights, base.file_sha256[bname])
            model = load_adapter(verified.config(), weights, verified.file_sha256[name],
                                 base_model)
        return run_task(task, volume, model=model, params=params, seed=seed,
                        device=self.device, options=self.options)
