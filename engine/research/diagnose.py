"""Quick diagnosis of trained models on the VALIDATION split (never the test split).

``python -m engine.research.diagnose ct_denoise --model DIR [--model DIR ...] [--raw RUN_DIR ...]``
scores each model folder, optionally the raw (non-EMA) weights of a training run's last
checkpoint, and the task's baselines (identity + NLM for restoration, HU lookup for CT->MR)
on a few validation phantoms with :mod:`engine.research.evaluate`'s scoring, and prints one line of
mean metrics per method and case list. Used to find out why a model loses to a baseline
(noise-level mismatch, under-training, EMA lag) before spending training time; the numbers
go to bench/results/engine_eval.md with the command.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from engine.research import baselines
from engine.research.evaluate import Method, model_method, phantom_cases, run_section
from engine.types import TaskName


def raw_model_dir(run_dir: Path | str, model_dir: Path | str, dst: Path | str) -> Path:
    """A model folder holding the RAW network weights of ``run_dir``'s last checkpoint (the
    shipped weights are the EMA), config copied from ``model_dir``."""
    from safetensors.torch import load_file, save_file

    run_dir, model_dir, dst = Path(run_dir), Path(model_dir), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    t = load_file(str(run_dir / "checkpoint.safetensors"))
    save_file(
        {k[4:]: v.contiguous() for k, v in t.items() if k.startswith("net.")},
        str(dst / "model.safetensors"),
    )
    shutil.copyfile(model_dir / "config.json", dst / "config.json")
    return dst


def diagnose(task: str, models: list[Path], raw: list[Path], n: int, size: int, n_slices: int,
             doses: tuple[float, ...], targets: tuple[str, ...]) -> list[dict[str, Any]]:
    """Print and return one row of mean validation metrics per (setting, method)."""
    tmp = Path(tempfile.mkdtemp(prefix="synthnode-diag-"))
    paths: dict[str, Path] = {}
    for i, r in enumerate(raw):
        cfg = json.loads((Path(r) / "checkpoint.json").read_text())
        mdir = Path(r).parent.parent / cfg["model_id"]
        paths[f"{cfg['model_id']} raw step {cfg['step']} ({r})"] = raw_model_dir(
            r, mdir, tmp / f"raw{i}"
        )
    for m in models:
        paths[f"{Path(m).name} EMA ({m})"] = Path(m)
    if task == TaskName.CT_DENOISE:
        settings: list[tuple[str, Any]] = [("dose", d) for d in doses]
    elif task == TaskName.CT_TO_MR:
        luts = baselines.fit_phantom_luts(24, size=size)
        settings = [("target", t) for t in targets]
    else:
        raise ValueError("diagnose supports ct_denoise and ct_to_mr")
    rows: list[dict[str, Any]] = []
    for key, val in settings:
        methods: dict[str, Method]
        if task == TaskName.CT_DENOISE:
            cases = phantom_cases(
                task, n, size=size, n_slices=n_slices, dose=float(val), split="val", start=500
            )
            methods = {
                "NLM": baselines.nlm_ct(),
                **{k: model_method(p, task)[0] for k, p in paths.items()},
            }
        else:
            cases = phantom_cases(
                task, n, size=size, n_slices=n_slices, target=str(val), split="val", start=500
            )
            methods = {
                "HU lookup": luts[str(val)],
                **{k: model_method(p, task, params={"target": val})[0] for k, p in paths.items()},
            }
        sec = run_section(
            f"{task} val {key} {val}", task, cases, methods, tmp / "pics", n_pictures=0
        )
        for name in sec.per_case:
            mean = sec.mean(name)
            row = {
                "task": task,
                key: val,
                "method": name,
                **{
                    k: round(v, 4)
                    for k, v in mean.items()
                    if k
                    in (
                        "psnr",
                        "ssim",
                        "noise_sd",
                        "lesion_contrast_ratio_ge5mm",
                        "lesion_dice_ge5mm",
                    )
                },
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:  # pragma: no cover - measurement entry point
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=[TaskName.CT_DENOISE, TaskName.CT_TO_MR])
    ap.add_argument("--model", type=Path, action="append", default=[])
    ap.add_argument(
        "--raw", type=Path, action="append", default=[], help="training run folder (.runs/ID)"
    )
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--slices", type=int, default=1)
    ap.add_argument("--dose", type=float, action="append", default=[])
    ap.add_argument("--target", action="append", default=[])
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    size = a.size or (512 if a.task == TaskName.CT_DENOISE else 256)
    diagnose(a.task, a.model, a.raw, a.n, size, a.slices, tuple(a.dose or [0.25, 0.1]),
             tuple(a.target or ["t1w", "t2w"]))


if __name__ == "__main__":  # pragma: no cover
    main()
