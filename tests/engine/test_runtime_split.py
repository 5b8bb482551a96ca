"""The node loads only the engine runtime (api, types, tasks, models, nets, wavelet), never
the research tooling in engine.research (phantoms, simulators, baselines, training,
evaluation)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The modules a running node imports (server, pipeline, workers, CLI entry point), then one
# engine run through the runtime path on a shipped model.
PROBE = r"""
import json, sys
import numpy as np
import node.app, node.cli, node.pipeline.orchestrator, node.pipeline.runner, node.cli.worker
from engine.api import Intensity, TaskName, Volume, run_task
from engine.models import load_model_dir
model = load_model_dir(sys.argv[1])
vol = Volume(np.zeros((1, 32, 32), np.float32), (2.0, 1.0, 1.0), Intensity.HU)
out = run_task(TaskName.CT_DENOISE, vol, model=model, params=None, seed=1, device="cpu")
print(json.dumps({"research": sorted(m for m in sys.modules if m.startswith("engine.research")),
                  "engine": sorted(m for m in sys.modules if m.startswith("engine")),
                  "task": out.provenance.task, "task_type": type(out.provenance.task).__name__}))
"""


def test_node_runtime_does_not_import_research_tooling() -> None:
    r = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "engine/weights/ct-denoise-wreg")],
                       cwd=ROOT, capture_output=True, text=True, check=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["research"] == [], got["research"]
    assert "engine.tasks" in got["engine"] and "engine.models" in got["engine"]
    # the provenance records the task's plain name (JSON / DICOM text), not an Enum
    assert got["task"] == "ct_denoise" and got["task_type"] == "str"


def test_task_registry_is_keyed_by_the_task_enum() -> None:
    from engine.tasks import TASKS
    from engine.types import TaskName

    assert set(TASKS) == set(TaskName)
    assert all(isinstance(k, TaskName) and spec.name == k for k, spec in TASKS.items())


def test_engine_runtime_modules_never_import_research() -> None:
    """Static check over every import (lazy ones too) of the runtime modules in engine/."""
    import ast

    offenders = []
    for path in sorted((ROOT / "engine").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("engine.research")]
    assert offenders == []
    assert (ROOT / "engine" / "adapters.py").exists()  # the adapters are runtime, checked here
