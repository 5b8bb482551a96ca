"""Validation-split sweep of the restoration parameter ``keep_sigma_mm`` (low-frequency
fidelity, engine.tasks) for one CT restoration model, beside NLM, in one run.

Usage::

    SYNTHNODE_ENGINE__THREADS=2 python bench/sweep_keep_sigma.py MODEL_DIR \
        [--sigma 0 0.7 0.85 1 1.25 1.5] [--n 8] [--out bench/results/eval/keep_sigma_val]

Cases: ``n`` VALIDATION-split phantoms (seeds 1e9 ..), 3 slices of 512 px, doses 0.25 and 0.1
(engine.research.evaluate.phantom_cases); never the test split. Every sigma runs through the task
parameter (``run_task(..., params={"keep_sigma_mm": s})``), scored by engine.research.evaluate.score.
Writes ``report.md`` + ``metrics.json`` (no pictures) under ``--out/<model_id>`` and prints the
rule used to choose the shipped value: the smallest sigma whose validation PSNR and SSIM beat
NLM's by at least 0.5 dB and 0.01 at both doses (the margin leaves room for the test split).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.research import baselines
from engine.research.evaluate import model_method, phantom_cases, run_section, write_report

PSNR_MARGIN, SSIM_MARGIN = 0.5, 0.01


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--sigma", type=float, nargs="+", default=[0.0, 0.7, 0.85, 1.0, 1.25, 1.5])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--dose", type=float, nargs="+", default=[0.25, 0.1])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval" / "keep_sigma_val")
    ap.add_argument("--cache", type=Path, default=None)
    a = ap.parse_args(argv)

    nlm = baselines.nlm_ct()
    methods = {f"NLM (h={nlm.h_factor} sigma)": nlm}
    model_id = ""
    for s in a.sigma:
        fn, desc = model_method(a.model, "ct_denoise", {"keep_sigma_mm": s}, seed=0)
        model_id = desc["model_id"]
        methods[f"keep_sigma_mm {s:g}"] = fn
    sections = []
    for dose in a.dose:
        cases = phantom_cases("ct_denoise", a.n, size=512, n_slices=3, dose=dose, split="val",
                              cache_dir=a.cache)
        sections.append(run_section(
            f"CT restoration, validation phantoms, dose {dose:g}", "ct_denoise", cases, methods, a.out,
            f"{a.n} VALIDATION-split phantoms, 3 slices of 512 px; {model_id} with each keep_sigma_mm",
            n_pictures=0))
    report = write_report(sections, a.out / model_id, f"keep_sigma_mm sweep: {model_id} (validation split)",
                          f"Command: `python bench/sweep_keep_sigma.py {a.model} --sigma "
                          f"{' '.join(f'{s:g}' for s in a.sigma)} --n {a.n}`")
    nlm_name = next(iter(methods))
    ok = []
    for s in a.sigma:
        name = f"keep_sigma_mm {s:g}"
        good = True
        for sec in sections:
            m, b = sec.mean(name), sec.mean(nlm_name)
            good &= m["psnr"] >= b["psnr"] + PSNR_MARGIN and m["ssim"] >= b["ssim"] + SSIM_MARGIN
        print(f"{name}: " + "; ".join(
            f"{sec.title.rsplit(' ', 2)[-1]} PSNR {sec.mean(name)['psnr']:.2f} SSIM {sec.mean(name)['ssim']:.4f} "
            f"contrast ratio >= 10 HU {sec.mean(name).get('lesion_contrast_ratio_visible', math.nan):.3f}"
            for sec in sections) + ("  [meets the NLM margin]" if good else ""))
        if good:
            ok.append(s)
    chosen = min((s for s in ok if s > 0), default=None)
    print(f"rule: smallest sigma > 0 with PSNR >= NLM + {PSNR_MARGIN} dB and SSIM >= NLM + {SSIM_MARGIN} "
          f"at every dose: {chosen}")
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
