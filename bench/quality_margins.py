"""Quality-gate margins of the shipped models (not a test; run by hand, numbers in
docs/pipeline.md "Quality gate").

    nice -n 10 python bench/quality_margins.py

Runs ``ct-denoise-wreg`` and ``ct-to-mr-wreg`` (T2w) from ``engine/weights`` on engine.research.phantoms
low-dose CT (the e2e phantom: abdomen 8 x 512 px seed 4242 at 0.25 dose, plus smaller
abdomen / head cases and lower doses), stored as the node receives them (integer HU), and
prints the gate's statistics per case with the default limits, then for deliberately broken
outputs derived from the restored CT (which checks hold them); last ``mr-denoise-wreg`` on
MR phantoms with Rician noise.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from engine.api import Intensity, Volume, run_task
from engine.research.degrade import low_dose_ct
from engine.models import load_model_dir
from engine.research.phantoms import make_sample
from node.pipeline.quality import check

WEIGHTS = Path(__file__).resolve().parents[1] / "engine" / "weights"
#: (name, seed, size, slices, kind, dose)
CASES = [("abdomen 512 (e2e)", 4242, 512, 8, "abdomen", 0.25), ("head 256", 7, 256, 8, "head", 0.25),
         ("abdomen 256", 99, 256, 8, "abdomen", 0.25), ("abdomen 256", 99, 256, 8, "abdomen", 0.05)]
KEYS = ("correlation", "slice_correlation_min", "slice_residual_mean_max_abs", "slice_edge_ratio_min",
        "slice_edge_ratio_max")


def broken(den: np.ndarray) -> dict[str, np.ndarray]:
    flat = den.copy()
    flat[(den > -300) & (den < 200)] = 40.0
    one_blur, one_shift = den.copy(), den.copy()
    one_blur[3] = ndimage.gaussian_filter(den[3], 8)
    one_shift[3] += 100.0
    one_scr = den.copy()
    one_scr[3] = np.random.default_rng(0).permutation(den[3].ravel()).reshape(den[3].shape)
    return {"soft tissue flattened to 40 HU": flat,
            "gaussian blur sigma 8 px": np.stack([ndimage.gaussian_filter(x, 8) for x in den]),
            "gaussian blur sigma 3 px": np.stack([ndimage.gaussian_filter(x, 3) for x in den]),
            "one slice blurred sigma 8 px": one_blur, "one slice +100 HU": one_shift,
            "one slice scrambled": one_scr}


def main() -> None:
    den_m, mr_m = load_model_dir(WEIGHTS / "ct-denoise-wreg"), load_model_dir(WEIGHTS / "ct-to-mr-wreg")
    for name, seed, size, n, kind, dose in CASES:
        s = make_sample(seed=seed, size=size, n_slices=n, kind=kind, mr_snr=None, bias_strength=0.0)
        low = low_dose_ct(s.ct_hu, s.spacing[1], dose, seed=11)
        src = Volume((np.clip(np.rint(low + 1024), 0, 65535) - 1024).astype(np.float32), s.spacing, Intensity.HU)
        den = run_task("ct_denoise", src, model=den_m, params={}, seed=1, device="cpu").outputs[0]
        mr = run_task("ct_to_mr", src, model=mr_m, params={"target": "t2w"}, seed=1, device="cpu").outputs[0]
        r = check(den, src)
        print(f"{name} dose {dose}: ct_denoise passed={r.passed} {r.checks} "
              + " ".join(f"{k}={r.stats[k]}" for k in KEYS))
        r = check(mr, src)
        print(f"{name} dose {dose}: ct_to_mr t2w passed={r.passed} {r.checks} min={r.stats['min']} "
              f"p99={r.stats['p99']} foreground_dice={r.stats['foreground_dice']} "
              f"slice_foreground_dice_min={r.stats['slice_foreground_dice_min']}")
        for label, x in broken(np.asarray(den.data, dtype=np.float32)).items():
            r = check(Volume(x, src.spacing, Intensity.HU), src)
            edge = r.stats.get("slice_edge_ratio_min", "-")
            print(f"    {label}: passed={r.passed} {r.checks} slice_edge_ratio_min={edge} "
                  f"correlation={r.stats.get('correlation', '-')}")
    mrd_m = load_model_dir(WEIGHTS / "mr-denoise-wreg")
    for kind, seed, snr in (("abdomen", 5, 20.0), ("head", 6, 20.0), ("abdomen", 8, 10.0)):
        s = make_sample(seed=seed, size=256, n_slices=4, kind=kind, mr_snr=snr)
        for name, intensity in (("t2w", Intensity.MR_T2W), ("t1w", Intensity.MR_T1W)):
            src = Volume(getattr(s, name).astype(np.float32), s.spacing, intensity)
            out = run_task("mr_denoise", src, model=mrd_m, params={}, seed=1, device="cpu").outputs[0]
            r = check(out, src)
            print(f"mr_denoise {kind} 256 SNR {snr:g} {name}: passed={r.passed} {r.checks} "
                  f"min={r.stats['min']} p99={r.stats['p99']} "
                  + " ".join(f"{k}={r.stats[k]}" for k in KEYS))


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    main()
