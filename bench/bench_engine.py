"""Engine latency and peak memory: CT restoration at 512x512 and CT->MR at 256x256.

Usage::

    nice -n 10 python bench/bench_engine.py [--threads 2] [--slices 8] [--repeats 3]

Each case runs in a fresh child process so its peak resident memory (``ru_maxrss``, which
includes the Python interpreter, torch and MONAI) is the case's own. Inputs are phantom slices
(engine.research.phantoms, test split) with Gaussian noise (timing does not depend on the content).
Writes bench/results/engine_speed.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "engine" / "weights"

CASES: list[tuple] = [
    # name, model folder, task, size, params[, run options: "batch" (slices per forward, overrides
    # --batch), "contiguous" (weights back in the NCHW layout, as before channels-last loading)]
    ("CT restoration (shipped: regression, 1 step, keep_sigma_mm 1.0)", "ct-denoise-wreg", "ct_denoise", 512, {}),
    ("CT restoration (shipped weights, keep_sigma_mm 0 = 1.3.0)", "ct-denoise-wreg", "ct_denoise", 512,
     {"keep_sigma_mm": 0.0}),
    ("CT restoration (shipped weights, ensemble 2)", "ct-denoise-wreg", "ct_denoise", 512, {"ensemble": 2}),
    ("CT restoration (experimental x0-diffusion 2.3.0: mean of 2 samples, the second on flipped slices, "
     + "2 steps from noise each, keep_sigma_mm 1.25)",
     "experimental/ct-denoise-wdiff", "ct_denoise", 512, {}),
    ("CT restoration (experimental x0-diffusion, samples 1 = 2.1.0)", "experimental/ct-denoise-wdiff",
     "ct_denoise", 512, {"samples": 1}),
    ("CT->MR T1w (shipped: regression, 1 step)", "ct-to-mr-wreg", "ct_to_mr", 256, {"target": "t1w"}),
    ("CT->MR T1w (shipped weights, ensemble 4)", "ct-to-mr-wreg", "ct_to_mr", 256,
     {"target": "t1w", "ensemble": 4}),
    ("CT->MR T1w (experimental x0-diffusion, 4 steps)", "experimental/ct-to-mr-wdiff", "ct_to_mr", 256,
     {"target": "t1w"}),
    ("MR denoise (shipped: regression, 1 step)", "mr-denoise-wreg", "mr_denoise", 256, {}),
    ("Augment CT, n=4 (x0-diffusion 2.1.0, 2 steps, ILVR keep_sigma_mm 1.25)", "ct-augment-wdiff", "augment", 256, {"n": 4}),
    # the runtime before channels-last weights and the one-slice CPU batch, side by side
    ("CT restoration (shipped regression; NCHW weights, batch 4: the runtime before)", "ct-denoise-wreg",
     "ct_denoise", 512, {}, {"batch": 4, "contiguous": True}),
    ("CT restoration (experimental x0-diffusion 2.3.0; NCHW weights, batch 4: the runtime before)",
     "experimental/ct-denoise-wdiff", "ct_denoise", 512, {}, {"batch": 4, "contiguous": True}),
    ("CT restoration (experimental x0-diffusion 2.3.0; channels-last weights, batch 4: the layout alone)",
     "experimental/ct-denoise-wdiff", "ct_denoise", 512, {}, {"batch": 4}),
    ("CT->MR T1w (shipped regression; NCHW weights, batch 4: the runtime before)", "ct-to-mr-wreg", "ct_to_mr", 256,
     {"target": "t1w"}, {"batch": 4, "contiguous": True}),
    # reconstruction adapters (ControlNet on the frozen ct-augment-wdiff base), experimental
    ("CT sparse-view adapter (experimental, 1 step on the frozen base)", "adapters/ct-sparse-view-cnet",
     "ct_sparse_view", 512, {}),
    ("MR undersampled adapter (experimental, 1 step on the frozen CT base)", "adapters/mr-undersampled-cnet",
     "mr_undersampled", 512, {}),
    ("the adapters' base alone, 1 step (ct-augment-wdiff as a CT restoration start, strength 0.05)",
     "ct-augment-wdiff", "augment", 512, {"n": 1, "steps": 1, "strength": 0.05}),
]


def one(model_dir: str, task: str, size: int, params: dict, slices: int, repeats: int, threads: int,
        device: str, batch: int | None, contiguous: bool = False) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from engine.research import phantoms
    from engine.api import Intensity, Volume, run_task
    from engine.adapters import load_model_or_adapter_dir
    from engine.tasks import RunOptions, default_batch_slices

    s = phantoms.make_sample(phantoms.split_seed("test", 0), size=size, n_slices=slices, kind="abdomen")
    rng = np.random.default_rng(0)
    if task in ("mr_denoise", "mr_undersampled"):
        vol = Volume(s.t1w, s.spacing, Intensity.MR_T1W)
    else:
        vol = Volume((s.ct_hu + rng.normal(0, 30, s.ct_hu.shape)).astype(np.float32), s.spacing, Intensity.HU)
    m = load_model_or_adapter_dir(WEIGHTS / model_dir)
    if contiguous:
        m.net.to(memory_format=torch.contiguous_format)
    opts = RunOptions(device=device, batch_slices=batch or default_batch_slices(device, size, size))
    run_task(task, vol, model=m, params=params, seed=0, options=opts)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        res = run_task(task, vol, model=m, params=params, seed=r, options=opts)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    n_out = len(res.outputs)
    per_slice = [t / (slices * n_out) for t in times]
    return {"per_slice_s": min(per_slice), "per_slice_mean_s": sum(per_slice) / len(per_slice),
            "steps": res.provenance.steps, "n_params": m.n_parameters,
            "ensemble": int(res.provenance.parameters.get("ensemble") or 1),
            "samples": int(res.provenance.parameters.get("samples") or 1),
            "batch": opts.batch_slices, "layout": "NCHW" if contiguous else "channels-last",
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "gpu_peak_mb": (torch.cuda.max_memory_allocated() / 2**20) if device.startswith("cuda") else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None,
                    help="slices per forward pass (default: the engine's, engine.tasks.default_batch_slices)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine_speed.md"))
    ap.add_argument("--match", default=None,
                    help="run only the cases whose name contains this text")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        spec = json.loads(a.one)
        print(json.dumps(one(**spec)))
        return
    rows = []
    for name, mdir, task, size, params, *run in CASES:
        if a.match and a.match not in name:
            continue
        ro = run[0] if run else {}
        if not (WEIGHTS / mdir / "model.safetensors").exists():
            print(f"skip {name}: {mdir} not shipped", file=sys.stderr)
            continue
        spec = {"model_dir": mdir, "task": task, "size": size, "params": params, "slices": a.slices,
                "repeats": a.repeats, "threads": a.threads, "device": a.device, "batch": ro.get("batch", a.batch),
                "contiguous": bool(ro.get("contiguous"))}
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                             cwd=ROOT)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            raise SystemExit(f"case {name} failed")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((name, size, r))
        print(name, json.dumps(r), flush=True)
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        "# Engine speed and memory",
        "",
        f"Command: `nice -n 10 python bench/bench_engine.py --threads {a.threads} --slices {a.slices} "
        f"--repeats {a.repeats}{f' --batch {a.batch}' if a.batch else ''} --device {a.device}"
        f"{f' --match {a.match!r}' if a.match else ''}{' --out ' + a.out if a.match else ''}`",
        "",
        f"Machine: {cpu}, torch threads {a.threads}, device {a.device}, {platform.python_version()}; "
        "the machine's 2 cores are shared with other work, so these are upper bounds.",
        "",
        "`ensemble`: test-time flips / rotations averaged (engine.tasks `ensemble`, one forward each); "
        "`samples`: diffusion samples averaged (engine.tasks `samples`, the steps run once per sample). "
        "Per-slice latency = best of the repeats of one `run_task` call on a "
        f"{a.slices}-slice volume (`batch` slices per forward pass; `layout` of the loaded weights: channels-last "
        "since 2026-12-06, NCHW before), divided by slices (x variants for augment). "
        "Peak memory = `ru_maxrss` of a fresh process that loads the model and runs the case "
        "(interpreter + torch + MONAI included).",
        "",
        ("| case | size | params | steps | ensemble | samples | batch | layout | s / slice (best) | s / slice (mean) "
         "| peak RSS (MB) |"),
        "|---|---|---|---|---:|---:|---:|---|---|---|---|",
    ]
    for name, size, r in rows:
        lines.append(f"| {name} | {size}x{size} | {r['n_params'] / 1e6:.2f} M | {r['steps']} | {r.get('ensemble', 1)} | "
                     f"{r.get('samples', 1)} | {r['batch']} | {r['layout']} | "
                     f"{r['per_slice_s']:.3f} | {r['per_slice_mean_s']:.3f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "Targets: <= 1 s per slice (CT restoration at 512x512, CT->MR at 256x256), peak < 2 GB.", ""]
    Path(a.out).write_text("\n".join(lines))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
