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

With ``--series``: the whole real series of docs/realdata.md (fetched by
scripts/fetch-realdata), none of them seen in training (the shipped models are trained on
phantoms only). The series as acquired is the reference; known noise is added inside its
field of view (CT: Gaussian, HU; MR: Rician, the given SD in the series' units), and the
noisy input, the shipped model (engine.api.run_task, CPU, seed 1) and two classical baselines
(Gaussian filter, sigma 1 px; bilateral filter, skimage, colour sigma = the noise SD, spatial
sigma 1.5 px), each slice on its own, are compared with the reference inside the FOV
(engine.research.metrics conventions: CT PSNR over -1000..1000 HU, SSIM on the -160..240 HU
window; MR PSNR / SSIM over 0..p99.9 of the reference):

    nice -n 10 python bench/real_quality.py --series
"""
from __future__ import annotations

import argparse
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


# (series, first slice, slices, task, noise SD)
SERIES_CASES = [
    ("cbct-head", 28, 8, "ct_denoise", 25.0),
    ("cbct-head", 28, 8, "ct_denoise", 50.0),
    ("mr-skyra-gre", 124, 8, "mr_denoise", 10.0),
    ("mr-skyra-gre", 124, 8, "mr_denoise", 20.0),
    ("mr-memprage", 0, 6, "mr_denoise", 15.0),
]


def _baselines(noise: float) -> dict[str, object]:
    from skimage.restoration import denoise_bilateral

    def gaussian(x: np.ndarray) -> np.ndarray:
        return np.stack([ndimage.gaussian_filter(s, 1.0) for s in x])

    def bilateral(x: np.ndarray) -> np.ndarray:
        return np.stack([denoise_bilateral(s.astype(np.float64), sigma_color=noise,
                                           sigma_spatial=1.5) for s in x])

    return {"Gaussian filter (1 px)": gaussian, "bilateral filter": bilateral}


def series_main() -> None:
    from engine.research.metrics import CT_RANGE, CT_WINDOW, mr_range, psnr, ssim
    from tests.support.realseries import available, read

    limits = QualityLimits()
    print("| series | slices | task | noise SD | method | PSNR in FOV (dB) | SSIM in FOV | "
          "gate | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, start, n, task, noise in SERIES_CASES:
        if not available(name):
            print(f"| {name} | not fetched: run scripts/fetch-realdata |", flush=True)
            continue
        ref = assemble(read(name, start, n)).volume
        r = np.asarray(ref.data, dtype=np.float64)
        fov = np.ones(r.shape, bool) if ref.fov is None else np.asarray(ref.fov)
        rng = np.random.default_rng(3)
        hu = Intensity(ref.intensity) is Intensity.HU
        if hu:
            noisy = r + rng.normal(0.0, noise, r.shape)
            vr, wr = CT_RANGE, CT_WINDOW
            unit = "HU"
        else:
            noisy = np.hypot(r + rng.normal(0.0, noise, r.shape), rng.normal(0.0, noise, r.shape))
            vr = wr = mr_range(r[fov])
            unit = "units"
        noisy = np.where(fov, noisy, r).astype(np.float32)
        src = Volume(noisy, ref.spacing, ref.intensity, fov=ref.fov)
        rows: list[tuple[str, np.ndarray, str, float]] = [("noisy input", noisy, "-", 0.0)]
        t0 = time.perf_counter()
        out = run_task(task, src, model=load_model_dir(WEIGHTS / MODELS[task]), params=None,
                       seed=1, device="cpu").outputs[0]
        secs = time.perf_counter() - t0
        report = check(out, src, limits)
        gate = "passed" if report.passed else "held: " + ", ".join(report.checks)
        rows.append((f"shipped {MODELS[task]}", np.asarray(out.data), gate, secs))
        for label, fn in _baselines(noise).items():
            t0 = time.perf_counter()
            y = fn(noisy)  # type: ignore[operator]
            rows.append((label, np.where(fov, y, r), "-", time.perf_counter() - t0))
        size = "x".join(map(str, r.shape[::-1]))
        for label, y, g, t in rows:
            print(f"| {name} | {size} (from {start}) | {task} | {noise:g} {unit} | {label} | "
                  f"{psnr(r, y, vr, mask=fov):.2f} | {ssim(r, y, wr, mask=fov):.4f} | {g} | "
                  f"{t:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", action="store_true",
                    help="the whole real series of docs/realdata.md instead of single slices")
    if ap.parse_args().series:
        series_main()
        return
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
