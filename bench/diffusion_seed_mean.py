"""Does averaging diffusion samples close the gap to the one-step regressor? (CT restoration)

Usage::

    SYNTHNODE_ENGINE__THREADS=2 python bench/diffusion_seed_mean.py \
        [--k 1 2 4] [--n 6] [--dose 0.25 0.1] [--split val] [--flips] [--regressor-ensemble 2] \
        [--out bench/results/eval/diffusion_seed_mean]

The diffusion model samples the posterior; the regressor is trained for its mean (MMSE), which
PSNR rewards. The mean of ``k`` samples, each with its own noise and the model's other defaults,
moves a sampler towards that mean at ``k`` times the cost: the task parameter ``samples``
(engine.tasks; sample 0 with the seed, sample j with ``SeedSequence([seed, j])``). Cases: ``n``
phantoms of ``--split`` (validation by default; engine.evaluate.phantom_cases), 3 slices of
512 px, beside NLM and the shipped regressor, scored by engine.evaluate.run_section. Writes
``report.md`` + ``metrics.json`` under ``--out/<split>``.

``--flips`` adds, for every k > 1, the same mean with ``sample_transforms`` "flips" (sample j
on the slices flipped / rotated 180 degrees, its output turned back); the rule that decides
whether a model ships with it (written before the first run): on the validation split, PSNR
and SSIM at least those of the independent samples at every dose. ``--regressor-ensemble N``
adds the regressor with its test-time ensemble of N flips / rotations (the regressor's
equivalent, for comparison).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import baselines
from engine.evaluate import model_method, phantom_cases, run_section, write_report

WEIGHTS = ROOT / "engine" / "weights"
DIFFUSION = WEIGHTS / "experimental" / "ct-denoise-wdiff"
REGRESSOR = WEIGHTS / "ct-denoise-wreg"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--dose", type=float, nargs="+", default=[0.25, 0.1])
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval" / "diffusion_seed_mean")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--flips", action="store_true")
    ap.add_argument("--regressor-ensemble", type=int, default=0)
    ap.add_argument("--diffusion", type=Path, default=DIFFUSION)
    a = ap.parse_args(argv)

    nlm = baselines.nlm_ct()
    reg, reg_desc = model_method(REGRESSOR, "ct_denoise", {}, seed=0)
    _, diff_desc = model_method(a.diffusion, "ct_denoise", {}, seed=0)
    methods = {f"NLM (h={nlm.h_factor} sigma)": nlm,
               f"{reg_desc['model_id']} {reg_desc['version']} (regression)": reg}
    if a.regressor_ensemble > 1:
        methods[f"{reg_desc['model_id']} {reg_desc['version']} (regression), ensemble {a.regressor_ensemble}"] = \
            model_method(REGRESSOR, "ct_denoise", {"ensemble": a.regressor_ensemble}, seed=0)[0]
    pairs = []
    for k in a.k:
        name = f"{diff_desc['model_id']} {diff_desc['version']}, samples {k}"
        methods[name] = model_method(a.diffusion, "ct_denoise", {"samples": k, "sample_transforms": "none"},
                                     seed=0)[0]
        if a.flips and k > 1:
            methods[f"{name}, flips"] = model_method(
                a.diffusion, "ct_denoise", {"samples": k, "sample_transforms": "flips"}, seed=0)[0]
            pairs.append((name, f"{name}, flips"))
    out = a.out / a.split
    sections = []
    for dose in a.dose:
        cases = phantom_cases("ct_denoise", a.n, size=512, n_slices=3, dose=dose, split=a.split,
                              cache_dir=a.cache)
        sections.append(run_section(
            f"CT restoration, {a.split} phantoms, dose {dose:g}", "ct_denoise", cases, methods, out,
            f"{a.n} {a.split}-split phantoms, 3 slices of 512 px; the diffusion model with samples k (mean of k samples)",
            n_pictures=0))
    report = write_report(sections, out, f"Diffusion sample means vs the regressor ({a.split} split)",
                          f"Command: `python bench/diffusion_seed_mean.py --k {' '.join(map(str, a.k))} "
                          f"--n {a.n} --split {a.split}{' --flips' if a.flips else ''}"
                          f"{f' --regressor-ensemble {a.regressor_ensemble}' if a.regressor_ensemble > 1 else ''}`")
    for sec in sections:
        print(sec.title)
        for name in methods:
            m = sec.mean(name)
            print(f"  {name}: PSNR {m['psnr']:.2f} SSIM {m['ssim']:.4f} "
                  f"contrast >= 10 HU {m.get('lesion_contrast_ratio_visible', float('nan')):.3f} "
                  f"s/slice {m['sec_per_slice']:.2f}")
    for plain, flipped in pairs:
        ok = all(sec.mean(flipped)["psnr"] >= sec.mean(plain)["psnr"] and sec.mean(flipped)["ssim"] >= sec.mean(plain)["ssim"]
                 for sec in sections)
        print(f"rule (PSNR and SSIM >= independent samples at every dose): {flipped}: {'met' if ok else 'not met'}")
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
