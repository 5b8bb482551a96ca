"""Does averaging diffusion samples close the gap to the one-step regressor? (CT / MR restoration)

Usage::

    SYNTHNODE_ENGINE__THREADS=2 python bench/diffusion_seed_mean.py \
        [--task ct_denoise] [--k 1 2 4] [--n 6] [--dose 0.25 0.1] [--snr 10 20] [--target t1w t2w] \
        [--split val] [--flips] \
        [--regressor-ensemble 2] \
        [--out bench/results/eval/diffusion_seed_mean]

The diffusion model samples the posterior; the regressor is trained for its mean (MMSE), which
PSNR rewards. The mean of ``k`` samples, each with its own noise and the model's other defaults,
moves a sampler towards that mean at ``k`` times the cost: the task parameter ``samples``
(engine.tasks; sample 0 with the seed, sample j with ``SeedSequence([seed, j])``). Cases: ``n``
phantoms of ``--split`` (validation by default; engine.research.evaluate.phantom_cases), 3 slices of
512 px at each ``--dose`` (``--task mr_denoise``: 256 px at each ``--snr``, the MR models;
``--task ct_to_mr``: 256 px, each ``--target``, no classical baseline), beside NLM and the shipped
regressor, scored by engine.research.evaluate.run_section. Writes
``report.md`` + ``metrics.json`` under ``--out/<split>``.

``--flips`` adds, for every k > 1, the same mean with ``sample_transforms`` "flips" (sample j
on the slices flipped / rotated 180 degrees, its output turned back); the rule that decides
whether a model ships with it (written before the first run): on the validation split, PSNR
and SSIM at least those of the independent samples at every dose. ``--regressor-ensemble N``
adds the regressor with its test-time ensemble of N flips / rotations (the regressor's
equivalent, for comparison). MR rule (written before the first ``--task mr_denoise`` run): the
MR diffusion model ships with ``samples`` 2 if on the validation split its PSNR, SSIM and body
SSIM reach those of one sample at every SNR, and with flips on top under the flips rule. CT->MR
rule (written before the first ``--task ct_to_mr`` run): the CT->MR diffusion model ships with
``samples`` 2 and flips if on the validation split, for both targets, PSNR, SSIM and lesion Dice
(>= 5 mm) reach those of one sample and false lesions per slice do not rise.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.research import baselines
from engine.research.evaluate import model_method, phantom_cases, run_section, write_report

WEIGHTS = ROOT / "engine" / "weights"
#: task -> (diffusion model, regressor, classical baseline or None, pixel size, level: "dose" / "snr" / "target")
SETUPS = {
    "ct_denoise": (WEIGHTS / "experimental" / "ct-denoise-wdiff", WEIGHTS / "ct-denoise-wreg", baselines.nlm_ct, 512,
                   "dose"),
    "mr_denoise": (WEIGHTS / "experimental" / "mr-denoise-wdiff", WEIGHTS / "mr-denoise-wreg", baselines.nlm_mr, 256,
                   "snr"),
    "ct_to_mr": (WEIGHTS / "experimental" / "ct-to-mr-wdiff", WEIGHTS / "ct-to-mr-wreg", None, 256, "target"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=sorted(SETUPS), default="ct_denoise")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--dose", type=float, nargs="+", default=[0.25, 0.1])
    ap.add_argument("--snr", type=float, nargs="+", default=[10.0, 20.0])
    ap.add_argument("--target", nargs="+", default=["t1w", "t2w"], choices=["t1w", "t2w"])
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval" / "diffusion_seed_mean")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--flips", action="store_true")
    ap.add_argument("--regressor-ensemble", type=int, default=0)
    ap.add_argument("--diffusion", type=Path, default=None, help="diffusion model folder (default: the task's)")
    a = ap.parse_args(argv)

    diffusion, regressor, baseline_fn, size, level = SETUPS[a.task]
    diffusion = a.diffusion or diffusion
    task = a.task
    _, reg_desc = model_method(regressor, task, {"target": "t1w"} if task == "ct_to_mr" else {}, seed=0)
    _, diff_desc = model_method(diffusion, task, {"target": "t1w"} if task == "ct_to_mr" else {}, seed=0)
    reg_name = f"{reg_desc['model_id']} {reg_desc['version']} (regression)"
    pairs: list[tuple[str, str]] = []

    def build_methods(extra: dict) -> dict:
        """The compared methods for one level (``extra``: the CT->MR target)."""
        ms = {}
        if baseline_fn is not None:
            b = baseline_fn()
            ms[f"NLM (h={b.h_factor} sigma)"] = b
        ms[reg_name] = model_method(regressor, task, dict(extra), seed=0)[0]
        if a.regressor_ensemble > 1:
            ms[f"{reg_name}, ensemble {a.regressor_ensemble}"] = model_method(
                regressor, task, {**extra, "ensemble": a.regressor_ensemble}, seed=0)[0]
        for k in a.k:
            name = f"{diff_desc['model_id']} {diff_desc['version']}, samples {k}"
            ms[name] = model_method(diffusion, task, {**extra, "samples": k, "sample_transforms": "none"}, seed=0)[0]
            if a.flips and k > 1:
                ms[f"{name}, flips"] = model_method(
                    diffusion, task, {**extra, "samples": k, "sample_transforms": "flips"}, seed=0)[0]
                if (name, f"{name}, flips") not in pairs:
                    pairs.append((name, f"{name}, flips"))
        return ms

    out = a.out / a.split if task == "ct_denoise" else a.out / f"{task}-{a.split}"
    sections = []
    what = {"ct_denoise": "CT restoration", "mr_denoise": "MR restoration", "ct_to_mr": "CT->MR"}[task]
    levels = {"dose": a.dose, "snr": a.snr, "target": a.target}[level]
    methods: dict = {}
    for value in levels:
        # the level is the phantom_cases keyword itself (MR: T1w and T2w alternating)
        cases = phantom_cases(task, a.n, size=size, n_slices=3, split=a.split, cache_dir=a.cache,
                              **({"snr": value, "target": "both"} if level == "snr" else {level: value}))
        methods = build_methods({"target": value} if level == "target" else {})
        label = f"{value:g}" if level != "target" else value
        sections.append(run_section(
            f"{what}, {a.split} phantoms, {level} {label}", task, cases, methods, out,
            f"{a.n} {a.split}-split phantoms, 3 slices of {size} px; the diffusion model with samples k (mean of k samples)",
            n_pictures=0))
    report = write_report(sections, out, f"Diffusion sample means vs the regressor ({a.split} split)",
                          f"Command: `python bench/diffusion_seed_mean.py --task {task} --k {' '.join(map(str, a.k))} "
                          f"--n {a.n} --split {a.split}{' --flips' if a.flips else ''}"
                          f"{f' --regressor-ensemble {a.regressor_ensemble}' if a.regressor_ensemble > 1 else ''}`")
    for sec in sections:
        print(sec.title)
        for name in methods:
            m = sec.mean(name)
            body = f"SSIM body {m['ssim_body']:.4f} " if "ssim_body" in m else ""
            print(f"  {name}: PSNR {m['psnr']:.2f} SSIM {m['ssim']:.4f} {body}"
                  f"contrast >= 10 HU {m.get('lesion_contrast_ratio_visible', float('nan')):.3f} "
                  f"Dice >= 5 mm {m.get('lesion_dice_ge5mm', float('nan')):.3f} "
                  f"false lesions / slice {m.get('false_lesions_per_slice', float('nan')):.2f} "
                  f"s/slice {m['sec_per_slice']:.2f}")
    for plain, flipped in pairs:
        ok = all(sec.mean(flipped)["psnr"] >= sec.mean(plain)["psnr"] and sec.mean(flipped)["ssim"] >= sec.mean(plain)["ssim"]
                 for sec in sections)
        print(f"rule (PSNR and SSIM >= independent samples at every {level}): {flipped}: {'met' if ok else 'not met'}")
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
