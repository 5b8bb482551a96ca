"""Quality against a reference on real slices: the clean real slice is the reference for its
noisy copies (the table "Real slices against their clean reference" of bench/RESULTS.md).

Each case builds a short series from one real scanner slice of pydicom's test data
(tests/support/realdata.py: real values kept, padding included; Gaussian noise of the given
SD in physical units on the non-padding pixels), runs the task with the shipped model
(engine.api.run_task, CPU, seed 1) and compares input and output with the noise-free series:
PSNR (peak = the reference's 1st-99th percentile span inside the field of view) and mean
absolute error, both inside the field of view (padding left out) and inside the body (CT:
engine.conditioning.body_mask of the reference; MR: reference above 10 % of its 99th
percentile, holes filled), plus the quality gate's verdict (default limits).

    nice -n 10 python bench/real_quality.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.api import Intensity, Volume, run_task
from engine.conditioning import body_mask
from engine.models import load_model_dir
from node.dicom.volume import assemble
from node.pipeline.quality import QualityLimits, check
from tests.support.realdata import series_from_real_slice

WEIGHTS = Path(__file__).resolve().parents[1] / "engine" / "weights"
MODELS = {"ct_denoise": "ct-denoise-wreg", "mr_denoise": "mr-denoise-wreg"}
# (file, task, noise SD in physical units, slices)
CASES = [
    ("693_UNCR.dcm", "ct_denoise", 25.0, 2),
    ("693_UNCR.dcm", "ct_denoise", 80.0, 2),
    ("CT_small.dcm", "ct_denoise", 25.0, 2),
    ("MR_small.dcm", "mr_denoise", 60.0, 2),
    ("MR2_UNCR.dcm", "mr_denoise", 60.0, 2),
]


def _masks(ref: Volume) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(ref.data)
    fov = np.ones(data.shape, bool) if ref.fov is None else np.asarray(ref.fov)
    if Intensity(ref.intensity) is Intensity.HU:
        body = body_mask(data, fov, ref.spacing)
    else:
        thr = 0.1 * float(np.percentile(data[fov], 99))
        body = np.stack([ndimage.binary_fill_holes(s) for s in (data > thr) & fov])
    return fov, body


def _psnr(x: np.ndarray, ref: np.ndarray, peak: float) -> float:
    mse = float(np.mean((x.astype(np.float64) - ref) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)


def main() -> None:
    limits = QualityLimits()
    print("| input | size | task | noise SD | PSNR in FOV: input -> output (dB) | "
          "MAE in body: input -> output | gate | engine s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, task, noise, n in CASES:
        ref = assemble(series_from_real_slice(name, n, noise=0.0)).volume
        src = assemble(series_from_real_slice(name, n, noise=noise, seed=3)).volume
        fov, body = _masks(ref)
        r = np.asarray(ref.data, dtype=np.float64)
        lo, hi = np.percentile(r[fov], [1.0, 99.0])
        peak = float(hi - lo)
        t0 = time.perf_counter()
        out = run_task(task, src, model=load_model_dir(WEIGHTS / MODELS[task]), params=None,
                       seed=1, device="cpu").outputs[0]
        secs = time.perf_counter() - t0
        report = check(out, src, limits)
        x, y = np.asarray(src.data), np.asarray(out.data)
        unit = "HU" if Intensity(ref.intensity) is Intensity.HU else "units"
        gate = "passed" if report.passed else "held: " + ", ".join(report.checks)
        print(f"| {name} | {'x'.join(map(str, r.shape[::-1]))} | {task} | {noise:g} {unit} | "
              f"{_psnr(x[fov], r[fov], peak):.1f} -> {_psnr(y[fov], r[fov], peak):.1f} | "
              f"{np.abs(x[body] - r[body]).mean():.1f} -> {np.abs(y[body] - r[body]).mean():.1f}"
              f" {unit} | {gate} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
