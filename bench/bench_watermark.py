"""Watermark robustness / false-positive benchmark (issue 5).

Positives: marked slices (engine phantoms CT / T1w / T2w at 256 px, phantom CT at 512 px (the
clinical matrix; the 256 px phantom CT is kept as a separately reported stress source), and the
real CT / MR slices shipped with pydicom and pydicom-data, augmented by flips, 90-degree
rotations, crops / shifts and noise). Negatives: unmarked slices of the same kinds drawn from *other* phantom seeds and other
augmentations. Every positive is detected after every transform of :data:`TRANSFORMS`; the
negatives without a transform (>= 10,000) plus a transformed subset give the false-positive
rate. Output: a Markdown table (TPR with Wilson 95 % intervals, payload decode rate, raw coded
bit error rate, fidelity) and a JSON dump.

Run (2 workers, low priority)::

    nice -n 10 python bench/bench_watermark.py --positives 3000 --negatives 10000 \
        --workers 2 --out bench/results/watermark.md

The transforms live in tests/support/watermark_transforms.py (shared with the tests).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import multiprocessing as mp
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audit.watermark import (  # noqa: E402
    CURRENT_FORMAT,
    WatermarkKey,
    codeword,
    detect,
    embed,
    embed_verified,
    make_payload,
    suggest_max_delta,
)
from audit.watermark import core as wm_core  # noqa: E402
from tests.support.watermark_transforms import (  # noqa: E402
    SLOW_TRANSFORMS,
    TRANSFORMS,
    Slice,
    wilson,
)
from tests.support.watermark_transforms import jpeg as _jpeg  # noqa: E402
from tests.support.watermark_transforms import to_stored as _to_stored  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")


# ----------------------------------------------------------------------------- data


def phantom_slices(seed0: int, n_volumes: int) -> Iterator[Slice]:
    """CT (12-bit unsigned, intercept -1024, + quantum noise), T1w / T2w (12 or 16-bit) of
    ``n_volumes`` 8-slice phantom volumes (see :func:`_phantom_one`)."""
    for v in range(n_volumes):
        yield from _phantom_one(seed0 + v)


REAL_FILES = (
    "693_UNCR.dcm", "CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "MR2_UNCR.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm", "examples_overlay.dcm", "eCT_Supplemental.dcm",
    "J2K_pixelrep_mismatch.dcm", "explicit_VR-UN.dcm", "RG3_UNCR.dcm", "RG1_UNCR.dcm",
)


def real_slices() -> list[Slice]:
    """Decoded real slices from pydicom / pydicom-data (each frame once, duplicates dropped)."""
    import pydicom
    from pydicom.data import get_testdata_file

    out: list[Slice] = []
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in REAL_FILES:
            try:
                path = get_testdata_file(name)
                if path is None:
                    continue
                ds = pydicom.dcmread(path)
                arr = ds.pixel_array
            except Exception:  # missing optional file or decoder: skip, the report lists sources
                continue
            frames = arr if arr.ndim == 3 else arr[None]
            bits = int(ds.BitsStored)
            signed = int(ds.PixelRepresentation) == 1
            for f in frames:
                if f.shape[0] > 600:  # large radiographs / MR: 2x2 binned to a CT-like size
                    f = f[: f.shape[0] // 2 * 2, : f.shape[1] // 2 * 2]
                    f = f.reshape(f.shape[0] // 2, 2, f.shape[1] // 2, 2).mean(axis=(1, 3)).round()
                f = _to_stored(f, bits, signed) if f.dtype.kind == "f" else f.astype(np.int16 if signed else np.uint16)
                digest = hashlib.sha256(f.tobytes()).hexdigest()
                if digest in seen:
                    continue
                seen.add(digest)
                out.append(Slice(f, bits, signed, float(ds.get("RescaleSlope", 1) or 1),
                                 float(ds.get("RescaleIntercept", 0) or 0), ds.get("Modality") == "CT",
                                 f"real:{name}"))
    return out


def augment(base: Slice, rng: np.random.Generator, min_side: int = 128) -> Slice:
    """Random flip / 90-degree rotation / crop (shift) / added noise of a real slice."""
    a = base.arr.astype(np.int64)
    if rng.random() < 0.5:
        a = a[:, ::-1]
    if rng.random() < 0.5:
        a = a[::-1]
    a = np.rot90(a, int(rng.integers(0, 4)))
    ny, nx = a.shape
    if min(ny, nx) > min_side + 32:
        side = int(rng.integers(min_side, min(ny, nx, 512) + 1))
        y0, x0 = int(rng.integers(0, ny - side + 1)), int(rng.integers(0, nx - side + 1))
        a = a[y0 : y0 + side, x0 : x0 + side]
    sigma = float(rng.choice([0.0, 1.0, 3.0, 8.0]))
    af = a.astype(np.float64)
    if sigma:
        af = af + rng.normal(0, sigma, a.shape)
    return Slice(_to_stored(af, base.bits, base.signed), base.bits, base.signed, base.slope, base.intercept,
                 base.ct, base.source + "+aug")


# ----------------------------------------------------------------------------- transforms


HEAVY = {"rle", "jpeg-ls lossless", "j2k lossless", "j2k lossy 10:1", "resize 2x"}
HEAVY_EVERY = 6
LIGHT_EVERY = 3
STRESS = "phantom-ct256"  # reported separately: 256 px phantom CT, ~60 % air (see docs/watermark.md)


# ----------------------------------------------------------------------------- metrics


def fidelity(s: Slice, marked: NDArray) -> dict[str, float]:
    from skimage.metrics import structural_similarity

    a = s.arr.astype(np.float64)
    d = marked.astype(np.float64) - a
    mse = float(np.mean(d * d))
    peak = float(2 ** s.bits - 1)
    rng_ = max(float(a.max() - a.min()), 1.0)
    return {
        "max_abs_delta": float(np.abs(d).max()),
        "psnr_db": 10 * math.log10(peak * peak / mse) if mse > 0 else float("inf"),
        "ssim": float(structural_similarity(a, marked.astype(np.float64), data_range=rng_)),
        "in_range": bool(marked.min() >= s.limits[0] and marked.max() <= s.limits[1]),
    }


KEY = WatermarkKey(hashlib.sha256(b"synthnode bench key").digest(), 7)
FMT = CURRENT_FORMAT  # --set: a variant of the mark format (bench only)
VARIANT: str | None = None  # --set variant=NAME: an experimental detector (bench/watermark_variants.py)
MAX_DELTA: int | None = None  # --max-delta: bound for CT positives (None: the shipped 2 HU rule)
OTHER_KEY = WatermarkKey(hashlib.sha256(b"synthnode bench other key").digest(), 8)


def _raw_ber(img: NDArray, det: object, cw: NDArray[np.uint8]) -> float:
    soft = getattr(det, "soft_bits", None)
    if soft is None:  # read the coded bits at the detector's best hypothesis anyway
        g = wm_core.folded_phase([wm_core.whiten(x) for x in wm_core._to_float_slices(img)],
                                 wm_core.period_for(det.scale))  # type: ignore[attr-defined]
        soft = wm_core.soft_bits(g, KEY, det.shift)  # type: ignore[attr-defined]
    return float(np.mean((soft < 0).astype(np.uint8) != cw))


def run_positive(args: tuple[int, Slice, bool]) -> dict[str, object]:
    idx, s, slow = args
    rng = np.random.default_rng(10_000 + idx)
    payload = make_payload(KEY.key_id, int(rng.integers(0, 1 << 40)))
    max_delta = (suggest_max_delta(s.arr, hu_calibrated=s.ct) if MAX_DELTA is None
                 else suggest_max_delta(s.arr, hu_calibrated=s.ct, floor=MAX_DELTA))
    marked = embed(s.arr, KEY, payload, bits_stored=s.bits, signed=s.signed, max_delta=max_delta)
    rec: dict[str, object] = {"source": s.source, "shape": list(s.arr.shape), "bits": s.bits,
                              "max_delta": max_delta,
                              "fidelity": fidelity(s, marked), "t": {}}
    cw = codeword(KEY, payload)
    transforms = dict(TRANSFORMS, **(SLOW_TRANSFORMS if slow else {}))
    pick = np.random.default_rng([idx, 7])  # which transforms this positive goes through
    for name, fn in transforms.items():
        draw = pick.random()
        if name in HEAVY and draw >= 1 / HEAVY_EVERY:
            continue
        if name not in HEAVY and name != "none" and name not in SLOW_TRANSFORMS and draw >= 1 / LIGHT_EVERY:
            continue
        img = fn(s, marked, rng)
        det = detect(img, [KEY])
        rec["t"][name] = {  # type: ignore[index]
            "score": det.score, "marked": det.marked, "payload_ok": det.payload == payload,
            "wrong_payload": det.payload is not None and det.payload != payload,
            "ber": _raw_ber(img, det, cw), "scale": det.scale,
        }
        if name == "none":
            other = detect(img, [OTHER_KEY])
            rec["other_key"] = {"score": other.score, "marked": other.marked, "decoded": other.payload is not None}
    return rec


def run_negative(args: tuple[int, Slice, bool]) -> dict[str, object]:
    idx, s, transformed = args
    rng = np.random.default_rng(20_000_000 + idx)
    names = list(TRANSFORMS) if transformed else ["none"]
    out: dict[str, object] = {"source": s.source, "t": {}}
    for name in names:
        img = TRANSFORMS[name](s, s.arr, rng)
        det = detect(img, [KEY])
        out["t"][name] = {"score": det.score, "marked": det.marked, "decoded": det.payload is not None}  # type: ignore[index]
    return out


# ----------------------------------------------------------------------------- driver


def _phantoms(pool: Any, seed0: int, n: int, size: int = 256) -> list[Slice]:
    per_vol = 8 * (3 if size == 256 else 1)  # 8 slices x (CT, T1w, T2w); CT only at 512
    seeds = [seed0 + v for v in range(n // per_vol + 1)]
    vols = pool.map(functools.partial(_phantom_one, size=size), seeds, chunksize=1)
    return [s for v in vols for s in v][:n]


def _phantom_one(seed: int, size: int = 256, n_slices: int = 8, ct_only: bool = False) -> list[Slice]:
    """One ``size`` x ``size`` x 8 phantom volume (abdomen; every tenth seed a head) as 24
    slices (CT, T1w, T2w) at 256 px, or 8 CT slices at 512 px (the clinical CT matrix).
    The 256 px CT slices (FOV 360 mm: ~60 % air) are the stress source ``phantom-ct256``."""
    from engine.research.phantoms import make_sample

    rng = np.random.default_rng(seed)
    kind: Literal["head", "abdomen"] = "head" if seed % 10 == 9 else "abdomen"
    s = make_sample(seed, size=size, n_slices=n_slices, kind=kind)
    out = []
    for z in range(s.ct_hu.shape[0]):
        sigma = rng.uniform(3.0, 20.0)
        hu = s.ct_hu[z] + rng.normal(0.0, sigma, s.ct_hu[z].shape)
        out.append(Slice(_to_stored(hu + 1024.0, 12, False), 12, False, 1.0, -1024.0, True,
                         f"phantom-ct{size}:{seed}:{z}"))
        if size != 256 or ct_only:
            continue
        for name, img in (("t1w", s.t1w[z]), ("t2w", s.t2w[z])):
            bits = 16 if (seed + z) % 2 else 12
            scale = (2 ** bits - 1) / max(float(img.max()), 1e-6) * rng.uniform(0.3, 0.9)
            out.append(Slice(_to_stored(img * scale, bits, False), bits, False, 1.0, 0.0, False,
                             f"phantom-{name}:{seed}:{z}"))
    return out


def build_sets(n_pos: int, n_neg: int, pool: Any) -> tuple[list[Slice], list[Slice]]:
    reals = real_slices()
    rng = np.random.default_rng(1)
    # Positives and negatives never share a phantom seed. 256 px phantoms (CT / T1w / T2w):
    # 40 % of the positives, 30 % of the negatives; 512 px phantom CT: 10 % / 4 %.
    pos_ph = _phantoms(pool, 2_000_000_000, n_pos * 2 // 5) + _phantoms(pool, 2_050_000_000, n_pos // 10, 512)
    neg_ph = _phantoms(pool, 2_100_000_000, n_neg * 3 // 10) + _phantoms(pool, 2_150_000_000, n_neg // 25, 512)
    # Positives stand for generated outputs (256 / 512 matrices): real slices >= 256 px only;
    # the 64 / 128 px slices are negatives only (their limit is documented separately).
    big = [r for r in reals if min(r.arr.shape) >= 256]
    pos = pos_ph + [augment(big[i % len(big)], rng, 256) for i in range(n_pos - len(pos_ph))]
    neg_base = neg_ph + list(reals)
    neg = neg_base + [augment(reals[i % len(reals)], rng) for i in range(n_neg - len(neg_base))]
    return pos, neg


def summarise(pos: list[dict], neg: list[dict], thr: float, command: str, elapsed: float,
              n_real: int) -> str:
    lines = ["# Watermark benchmark", "", f"Command: `{command}`", "",
             f"Elapsed {elapsed / 60:.1f} min; detector threshold {thr:.3f} "
             f"(Bonferroni, FPR <= 0.1 % over {wm_core.DEFAULT_SCALES} scales x shifts, 1 key).", ""]
    neg_scores = np.array([r["t"]["none"]["score"] for r in neg])
    neg_marked = sum(r["t"]["none"]["marked"] for r in neg)
    lo, hi = wilson(neg_marked, len(neg))
    emp_thr = float(np.quantile(neg_scores, 0.999))
    lines += [
        "## False positives (unmarked slices, no transform)", "",
        f"- negatives: {len(neg)} (phantoms CT/T1w/T2w from held-out seeds, {n_real} distinct real "
        "pydicom/pydicom-data slices and their augmentations)",
        f"- flagged marked: {neg_marked} -> FPR {neg_marked / len(neg):.4%} "
        f"(Wilson 95 % {lo:.4%} .. {hi:.4%})",
        f"- payload decoded (CRC passed) on a negative: {sum(r['t']['none']['decoded'] for r in neg)}",
        f"- score: mean {neg_scores.mean():.2f}, sd {neg_scores.std():.2f}, max {neg_scores.max():.2f}, "
        f"empirical 99.9th percentile {emp_thr:.2f}", "",
    ]
    tneg = [r for r in neg if len(r["t"]) > 1]
    if tneg:
        lines += ["Transformed negatives (" + str(len(tneg)) + " slices x each transform): "
                  + ", ".join(f"{k} {sum(r['t'][k]['marked'] for r in tneg)}" for k in TRANSFORMS)
                  + " flagged.", ""]
    fid = [r["fidelity"] for r in pos]
    md0 = 2 if MAX_DELTA is None else MAX_DELTA
    md = np.array([f["max_abs_delta"] for f in fid])
    ps = np.array([f["psnr_db"] for f in fid])
    ss = np.array([f["ssim"] for f in fid])
    lines += [
        "## Fidelity of embedding (strength " f"{CURRENT_FORMAT.strength}; max_delta = {md0} for CT (HU), "
        f"suggest_max_delta = max({md0}, 0.25 x noise sd) for MR / other)", "",
        f"- positives: {len(pos)}; max |delta| over all: {md.max():.0f}; outside valid range: "
        f"{sum(not f['in_range'] for f in fid)}",
        f"- PSNR at stored bit depth: min {ps.min():.1f} dB, median {np.median(ps):.1f} dB",
        f"- SSIM (data range = slice range): min {ss.min():.5f}, median {np.median(ss):.5f}", "",
        "## Detection after each transform (positives)", "",
        f"The column 'TPR without {STRESS}' leaves out the stress source {STRESS} (256 px phantom CT, "
        "~60 % air, reported per source below); the other columns include every positive.", "",
        "| transform | n | TPR at threshold | Wilson 95 % | TPR without " + STRESS + " (Wilson 95 %) | "
        "TPR at empirical 0.1 % FPR | payload decoded | wrong payload | raw coded BER | median score |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = list(TRANSFORMS) + list(SLOW_TRANSFORMS)
    for name in names:
        rows = [r["t"][name] for r in pos if name in r["t"]]
        if not rows:
            continue
        n = len(rows)
        k = sum(x["marked"] for x in rows)
        lo, hi = wilson(k, n)
        rows_ns = [r["t"][name] for r in pos if name in r["t"] and not str(r["source"]).startswith(STRESS + ":")]
        k_ns = sum(x["marked"] for x in rows_ns)
        lo_ns, hi_ns = wilson(k_ns, len(rows_ns))
        ns_cell = (f"{k_ns / len(rows_ns):.2%} ({lo_ns:.1%} .. {hi_ns:.1%}, n {len(rows_ns)})" if rows_ns else "-")
        k_emp = sum(x["score"] > emp_thr or x["payload_ok"] for x in rows)
        dec = sum(x["payload_ok"] for x in rows)
        wrong = sum(x["wrong_payload"] for x in rows)
        ber = float(np.mean([x["ber"] for x in rows]))
        med = float(np.median([x["score"] for x in rows]))
        lines.append(f"| {name} | {n} | {k / n:.2%} | {lo:.2%} .. {hi:.2%} | {ns_cell} | {k_emp / n:.2%} | "
                     f"{dec / n:.2%} | {wrong} | {ber:.4f} | {med:.2f} |")
    other = [r["other_key"] for r in pos]
    lines += ["", f"Wrong key on {len(other)} marked slices: flagged {sum(o['marked'] for o in other)}, "
              f"payload decoded {sum(o['decoded'] for o in other)}.", ""]
    by_src: dict[str, list[dict]] = {}
    for r in pos:
        by_src.setdefault(str(r["source"]).split(":")[0] + (":" + str(r["source"]).split(":")[1]
                          if str(r["source"]).startswith("real") else ""), []).append(r)
    cols = ("none", "png window soft", "png window brain", "jpeg q75 (soft)", "contrast x1.5 (8-bit)",
            "j2k lossy 10:1", "resize 0.5x", "crop <=10%/side")
    lines += ["## TPR per source", "",
              "| source | n | max_delta (median) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
    for src, rs in sorted(by_src.items()):
        cells = [f"{np.median([r['max_delta'] for r in rs]):.0f}"]
        for t in cols:
            vals = [r["t"][t]["marked"] for r in rs if t in r["t"]]
            cells.append(f"{np.mean(vals):.1%} ({len(vals)})" if vals else "-")
        lines.append(f"| {src} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


MINI_TRANSFORMS = ("none", "png window soft", "png window brain", "png window lung", "jpeg q90 (soft)",
                   "jpeg q75 (soft)", "jpeg q75 (lung)", "contrast x1.5 (8-bit)", "brightness x1.5 (8-bit)",
                   "crop <=10%/side", "j2k lossy 10:1", "resize 0.5x")
MINI_HARD = ("explicit_VR-UN", "eCT_Supplemental", "examples_overlay", "MR-SIEMENS")


def _apply_overrides(sets: list[str]) -> None:
    """``--set NAME=VALUE``: a variant of the shipped mark format (any field of
    :class:`audit.watermark.MarkFormat`, e.g. ``energy_weight=0.5``), or
    ``variant=NAME`` (an experimental detector of bench/watermark_variants.py: ``median``,
    ``wiener``, ``median_hp``, ``clip_mask``, ``edge9``). The value is parsed as a Python
    literal, else kept as a string. The product code is never modified."""
    import ast
    import dataclasses

    global FMT, VARIANT
    changes: dict[str, Any] = {}
    for item in sets:
        lhs, _, rhs = item.partition("=")
        lhs = lhs.removeprefix("core.").removeprefix("pattern.").lower()
        if lhs == "variant":
            from bench.watermark_variants import VARIANTS

            if rhs not in VARIANTS:
                raise SystemExit(f"--set variant: one of {sorted(VARIANTS)}")
            VARIANT = rhs
            continue
        if lhs not in {f.name for f in dataclasses.fields(CURRENT_FORMAT)} or lhs == "version":
            raise SystemExit(f"--set: unknown mark format field {lhs!r}")
        try:
            changes[lhs] = ast.literal_eval(rhs)
        except (ValueError, SyntaxError):
            changes[lhs] = rhs
    if changes:  # a bench-only version number: never confused with a shipped format
        FMT = dataclasses.replace(CURRENT_FORMAT, version=1000, **changes)


def _detect(img: NDArray, keys: list[WatermarkKey]) -> Any:
    """The detector under test: the shipped one, or the --set variant."""
    if VARIANT is None and FMT is CURRENT_FORMAT:
        return detect(img, keys)
    from bench.watermark_variants import detect_variant

    return detect_variant(img, keys, FMT, VARIANT)


def _embed(arr: NDArray, payload: int, **kw: Any) -> NDArray:
    return embed(arr, KEY, payload, fmt=FMT, **kw)


def mini(max_delta: int | None = None, sets: tuple[str, ...] = (), json_out: Path | None = None,
         negatives: bool = True) -> None:
    """Fast mini-benchmark (one process, ~1 min) used to compare detector / embedder variants:
    108 positives from the hardest sources x :data:`MINI_TRANSFORMS` and 1,000 negatives for
    the null score tail. Prints TPR / payload-decoded % and median score per source, and the
    embedding fidelity. ``max_delta``: bound for the HU-calibrated CT positives (others get
    ``max(max_delta, 0.25 x noise sd)``); None: the shipped rule (2 HU / noise-relative)."""
    _apply_overrides(list(sets))
    pos: list[Slice] = []
    neg: list[Slice] = []
    for sd in range(12):
        pos += _phantom_one(3_000_000 + sd, 256, 4, ct_only=True)
    for sd in range(5):
        pos += _phantom_one(3_100_000 + sd, 512, 4)
    reals = real_slices()
    rng = np.random.default_rng(5)
    hard = [r for r in reals if any(k in r.source for k in MINI_HARD)]
    pos += [augment(hard[i % len(hard)], rng, 256) for i in range(40)]
    if negatives:
        for sd in range(40):
            neg += _phantom_one(4_000_000 + sd, 256, 4, ct_only=True)
        for sd in range(8):
            neg += _phantom_one(4_100_000 + sd, 512, 4)
        neg += reals
        while len(neg) < 1000:
            neg.append(augment(reals[len(neg) % len(reals)], rng))
    t0 = time.time()
    res: dict[tuple[str, str], list[tuple[bool, bool, float]]] = {}
    fids: list[dict[str, Any]] = []
    per: dict[str, list[list[object]]] = {}  # per positive (in order): [marked, score]
    for i, s in enumerate(pos):
        rng = np.random.default_rng(i)
        payload = make_payload(KEY.key_id, int(rng.integers(0, 1 << 40)))
        if max_delta is None:
            md = suggest_max_delta(s.arr, hu_calibrated=s.ct)
        else:
            md = suggest_max_delta(s.arr, hu_calibrated=s.ct, floor=max_delta)
        marked = _embed(s.arr, payload, bits_stored=s.bits, signed=s.signed, max_delta=md)
        src = s.source.split(":")[1][:12] if s.source.startswith("real") else s.source.split(":")[0]
        fids.append({**fidelity(s, marked), "source": src, "ct": s.ct, "max_delta": md})
        for t in MINI_TRANSFORMS:
            d = _detect(TRANSFORMS[t](s, marked, rng), [KEY])
            res.setdefault((src, t), []).append((d.marked, d.payload == payload, d.score))
            per.setdefault(t, []).append([bool(d.marked), round(float(d.score), 3)])
    ns = np.array([_detect(s.arr, [KEY]).score for s in neg]) if neg else np.zeros(1)
    thr = wm_core.threshold_for(1)
    print(f"mini: {len(pos)} positives, {len(neg)} negatives, {time.time() - t0:.0f} s; negatives flagged "
          f"{int(np.sum(ns >= thr)) if neg else '-'}, score mean {ns.mean():.2f} sd {ns.std():.2f} max {ns.max():.2f}"
          f"; max_delta {'shipped rule' if max_delta is None else max_delta}; overrides {list(sets) or 'none'}")
    ct_f = [f for f in fids if f["ct"]]
    print(f"fidelity (CT positives, n {len(ct_f)}): max |delta| {max(f['max_abs_delta'] for f in ct_f):.0f}, "
          f"PSNR min {min(f['psnr_db'] for f in ct_f):.1f} median {np.median([f['psnr_db'] for f in ct_f]):.1f} dB, "
          f"SSIM min {min(f['ssim'] for f in ct_f):.4f} median {np.median([f['ssim'] for f in ct_f]):.4f}")
    srcs = sorted({k[0] for k in res})
    print(f"{'transform':24s}" + "".join(f"{x[:13]:>15s}" for x in srcs) + "   ALL TPR / payload")
    table: dict[str, dict[str, object]] = {}
    for t in MINI_TRANSFORMS:
        cells, every = [], []
        for x in srcs:
            r = res[(x, t)]
            every += r
            cells.append(f"{100 * np.mean([v[0] for v in r]):4.0f}/{100 * np.mean([v[1] for v in r]):3.0f} "
                         f"{np.median([v[2] for v in r]):4.1f}")
        print(f"{t[:24]:24s}" + "".join(f"{c:>15s}" for c in cells)
              + f"   {100 * np.mean([v[0] for v in every]):5.1f} / {100 * np.mean([v[1] for v in every]):5.1f}")
        table[t] = {"tpr": float(np.mean([v[0] for v in every])), "payload": float(np.mean([v[1] for v in every])),
                    "n": len(every), "per_positive": per[t],
                    "by_source": {x: float(np.mean([v[0] for v in res[(x, t)]])) for x in srcs}}
    if json_out is not None:
        json_out.write_text(json.dumps({
            "max_delta": max_delta, "overrides": list(sets), "threshold": thr,
            "neg": {"n": len(neg), "flagged": int(np.sum(ns >= thr)) if neg else None,
                    "max": float(ns.max()) if neg else None,
                    "top10": sorted(float(x) for x in ns)[-10:] if neg else None},
            "fidelity": fids, "transforms": table}, indent=1))


def sweep_report(paths: list[Path], png: Path | None) -> str:
    """Markdown table (TPR per transform and fidelity at each max_delta) from ``--mini --json``
    dumps of a max_delta sweep, and optionally a plot (TPR vs max_delta per transform; needs
    matplotlib, which is not a project dependency)."""
    runs = sorted((json.loads(p.read_text()) for p in paths), key=lambda d: d["max_delta"] or 2)
    names = [t for t in MINI_TRANSFORMS if t in runs[0]["transforms"]]
    head = "| max_delta (CT, stored units = HU) | " + " | ".join(
        str(d["max_delta"] or "2 (default)") for d in runs) + " |"
    lines = [head, "|---" * (len(runs) + 1) + "|"]
    for label, key_, fmt in (("max \\|delta\\| (CT)", "max_abs_delta", "{:.0f}"),
                             ("PSNR min / median (dB, CT)", "psnr_db", None),
                             ("SSIM min / median (CT)", "ssim", None)):
        cells = []
        for d in runs:
            v = [f[key_] for f in d["fidelity"] if f["ct"]]
            if fmt:
                cells.append(fmt.format(max(v)))
            elif key_ == "psnr_db":
                cells.append(f"{min(v):.1f} / {np.median(v):.1f}")
            else:
                cells.append(f"{min(v):.4f} / {np.median(v):.4f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    rms = [float(np.sqrt(np.mean(wm_core.mark_delta(KEY, 0, (512, 512), max_delta=d["max_delta"] or 2)
                                 .astype(np.float64) ** 2))) for d in runs]
    lines.append("| RMS change (stored units = HU, before range clipping) | "
                 + " | ".join(f"{r:.2f}" for r in rms) + " |")
    for t in names:
        lines.append(f"| TPR {t} | " + " | ".join(
            f"{100 * d['transforms'][t]['tpr']:.1f}" for d in runs) + " |")
    lines.append("| payload decoded, no transform | " + " | ".join(
        f"{100 * d['transforms']['none']['payload']:.1f}" for d in runs) + " |")
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xs = [d["max_delta"] or 2 for d in runs]
        fig, ax = plt.subplots(figsize=(8.5, 5.2), dpi=110)
        markers = "os^vD<>px*hH"
        for i, t in enumerate(names):
            ax.plot(xs, [100 * d["transforms"][t]["tpr"] for d in runs], marker=markers[i % len(markers)],
                    label=t, linestyle="-" if i < 10 else "--")
        ax.axhline(99, color="k", linewidth=0.8, linestyle=":")
        ax.text(xs[0], 99.4, "aim 99 %", fontsize=8)
        ax.set_xlabel("max_delta (stored units = HU on CT)")
        ax.set_ylabel("TPR at FPR <= 0.1 % (%)")
        ax.set_xticks(xs)
        ax.set_title(f"Watermark mini-benchmark: TPR vs fidelity bound ({runs[0]['transforms']['none']['n']} positives)",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right", ncol=2)
        fig.tight_layout()
        fig.savefig(png)
    return "\n".join(lines) + "\n"


def flat_survival(deltas: tuple[int, ...] = (2, 3, 4, 6)) -> str:
    """How much of the mark an 8-bit rendering and JPEG keep where the host cannot dither it:
    the mark at max_delta d on a constant host (and on the host plus 5 HU Gaussian noise),
    windowed to 8 bits (brain 80 / soft 400 / lung 1500 HU wide), PNG or JPEG (PIL) q90 / q75.
    Reported: the projection of the decoded image on the mark in units of the mark's grey
    amplitude (1 = intact, 0 = gone), mean over 16 host grey-level offsets."""
    from audit.watermark.core import mark_delta

    rng = np.random.default_rng(0)
    lines = ["| window (width, HU) | max_delta | mark amplitude (grey levels) | flat: PNG | flat: JPEG q90 | "
             "flat: JPEG q75 | 5 HU noise: JPEG q75 | mark DCT energy >= q75 half-step |",
             "|---|---|---|---|---|---|---|---|"]
    from scipy.fft import dctn

    from bench.watermark_variants import JPEG_LUMA

    q75 = np.floor((JPEG_LUMA * 50 + 50) / 100)  # IJG scaling of the Annex K table at quality 75

    def kept(img: NDArray, m: NDArray, width: float) -> float:
        r = img.astype(np.float64) - img.mean()
        return float(np.sum(r * m) / np.sum(m * m) / (255.0 / width))

    for wname, width in (("brain", 80.0), ("soft", 400.0), ("lung", 1500.0)):
        for d in deltas:
            m = mark_delta(KEY, make_payload(KEY.key_id, 12345), (256, 256), max_delta=d).astype(np.float64)
            acc = np.zeros(4)
            offsets = (np.arange(16) + 0.5) / 16
            for off in offsets:
                x8 = np.clip(np.rint(127 + off + m * 255.0 / width), 0, 255).astype(np.uint8)
                xn = np.clip(np.rint(127 + off + (m + rng.normal(0, 5, m.shape)) * 255.0 / width), 0, 255).astype(np.uint8)
                acc += [kept(x8, m, width), kept(_jpeg(x8, 90), m, width), kept(_jpeg(x8, 75), m, width),
                        kept(_jpeg(xn, 75), m, width)]
            acc /= len(offsets)
            c = dctn(m.reshape(32, 8, 32, 8).transpose(0, 2, 1, 3), axes=(2, 3), norm="ortho") * (255.0 / width)
            e = c * c  # share of the mark's energy in coefficients that JPEG q75 does not round to 0
            dead = float((e * (np.abs(c) >= q75 / 2)).sum() / e.sum())
            lines.append(f"| {wname} ({width:.0f}) | {d} | {d * 255 / width:.2f} | "
                         + " | ".join(f"{v:.2f}" for v in acc) + f" | {dead:.2f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- series run (bounds by meaning)

#: the transforms of the aim (every one must reach TPR >= 99 % at FPR <= 0.1 %) and the two
#: exempt ones (a mark that survives them is visible; TPR reported anyway)
SERIES_TRANSFORMS = ("none", "png window brain", "png window soft", "png window lung",
                     "jpeg q90 (soft)", "jpeg q75 (soft)", "contrast x1.5 (8-bit)",
                     "brightness x1.5 (8-bit)", "j2k lossy 10:1", "crop <=10%/side",
                     "+-1 LSB noise", "jpeg q75 (lung)", "resize 0.5x")
EXEMPT = ("jpeg q75 (lung)", "resize 0.5x")
SERIES_SLICES = 4
NOISE_FRACTION = 0.0  # --noise-fraction: watermark.other_noise_fraction for non-HU outputs
SERIES_SIZES = (128, 256, 512, 1024)  # --sizes
SERIES_KINDS = ("ct", "t1w", "t2w")  # --kinds
HU_MAX_CHANGE = 4.0  # --hu-max-change: the CT bound (FidelityBound.hu_max_change; shipped 4)
EMBED_FMT = CURRENT_FORMAT  # --embed-set FIELD=VALUE: an embedding variant (bench-only version 90)


def _as_output(arr: NDArray, ct: bool) -> tuple[NDArray, int]:
    """Stored values as the pipeline stores an output (node.dicom.volume.to_stored): HU with
    slope 1 for CT; anything else scaled linearly onto 4,096 levels (12 bits)."""
    if ct:
        return arr, 0
    a = arr.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    return np.rint((a - lo) / max(hi - lo, 1e-9) * 4095.0).astype(np.uint16), 12


def _series_hosts(spec: tuple[str, int, int]) -> list[Slice]:
    """One unmarked output series: ``(kind, size, seed)``; kind ct / t1w / t2w (a phantom
    volume at ``size`` px, SERIES_SLICES slices) or real:<index> (augmentations of one real
    slice >= 256 px, each a slice of the series)."""
    kind, size, seed = spec
    rng = np.random.default_rng(seed)
    if kind.startswith("real:"):
        big = [r for r in real_slices() if min(r.arr.shape) >= 256]
        base = big[int(kind[5:]) % len(big)]
        out = []
        for _ in range(SERIES_SLICES):
            a = augment(base, rng, 256)
            arr, bits = _as_output(a.arr, a.ct)
            out.append(Slice(arr, bits or a.bits, a.signed and a.ct, a.slope if a.ct else 1.0,
                             a.intercept if a.ct else 0.0, a.ct, base.source))
        return out
    from engine.research.phantoms import make_sample

    ph = make_sample(seed, size=size, n_slices=SERIES_SLICES,
                     kind="head" if seed % 10 == 9 else "abdomen")
    out = []
    for z in range(SERIES_SLICES):
        if kind == "ct":
            hu = ph.ct_hu[z] + rng.normal(0.0, rng.uniform(3.0, 20.0), ph.ct_hu[z].shape)
            out.append(Slice(_to_stored(hu + 1024.0, 12, False), 12, False, 1.0, -1024.0, True,
                             f"phantom-ct{size}"))
        else:
            img = (ph.t1w if kind == "t1w" else ph.t2w)[z]
            arr, _ = _as_output(img, False)
            out.append(Slice(arr, 12, False, 1.0, 0.0, False, f"phantom-{kind}{size}"))
    return out


def run_series(args: tuple[int, tuple[str, int, int]]) -> dict[str, object]:
    """Mark one series at the fidelity bound, put every slice through each transform (the same
    draw for every slice of the series, as one export would), detect slice by slice and on
    the pooled series."""
    from audit.watermark.fidelity import FidelityBound, measure

    idx, spec = args
    hosts = _series_hosts(spec)
    bound = FidelityBound(other_noise_fraction=NOISE_FRACTION, hu_max_change=HU_MAX_CHANGE)
    payload = make_payload(KEY.key_id, int(np.random.default_rng(idx).integers(0, 1 << 40)))
    marked, fids = [], []
    for h in hosts:  # as the pipeline marks: start at the bound, raise (below the noise,
        # PSNR floor kept) only where the untransformed slice's mark is not read
        d, ceiling = bound.limits(h.arr, hu=h.ct, slope=h.slope, peak=None if h.ct else 4095)
        if NOISE_FRACTION and ceiling > d:
            m3, rep = embed_verified(h.arr[None], KEY, payload, units=[[0]], bits_stored=h.bits,
                                     signed=h.signed, max_delta=d, ceiling=ceiling,
                                     noise_fraction=NOISE_FRACTION)
            m, d = m3[0], rep.max_delta[0]
        else:
            m = embed(h.arr, KEY, payload, bits_stored=h.bits, signed=h.signed, max_delta=d,
                      fmt=EMBED_FMT)
        marked.append(m)
        fids.append(dict(measure(h.arr, m, slope=h.slope, hu=h.ct,
                                 peak=None if h.ct else 4095), max_delta=d))
    rec: dict[str, object] = {"kind": spec[0], "size": int(hosts[0].arr.shape[0]),
                              "source": hosts[0].source, "ct": hosts[0].ct, "fidelity": fids,
                              "t": {}}
    for ti, name in enumerate(SERIES_TRANSFORMS):
        imgs = [TRANSFORMS[name](h, m, np.random.default_rng([idx, ti]))
                for h, m in zip(hosts, marked, strict=True)]
        singles = [detect(x, [KEY]) for x in imgs]
        pooled = detect(imgs, [KEY])
        rec["t"][name] = {  # type: ignore[index]
            "single": [bool(d.marked) for d in singles],
            "single_payload": [d.payload == payload for d in singles],
            "single_score": [round(float(d.score), 3) for d in singles],
            "series": bool(pooled.marked), "series_payload": pooled.payload == payload,
            "series_score": round(float(pooled.score), 3),
            "wrong_payload": any(d.payload not in (None, payload) for d in [*singles, pooled]),
        }
    return rec


def run_negative_group(args: tuple[int, list[Slice], bool]) -> dict[str, object]:
    """Unmarked slices: each alone, and (``pooled``) together as one series."""
    idx, group, pooled = args
    singles = [detect(s.arr, [KEY]) for s in group]
    out: dict[str, object] = {
        "single": [bool(d.marked) for d in singles],
        "single_score": [float(d.score) for d in singles],
        "decoded": sum(d.payload is not None for d in singles),
        "sources": [s.source for s in group],
    }
    if pooled and len({s.arr.shape for s in group}) >= 1:
        d = detect([s.arr for s in group], [KEY])
        out["series"] = bool(d.marked)
        out["series_score"] = float(d.score)
        out["series_decoded"] = d.payload is not None
    return out


def series_specs(n_per_cell: int, n_real: int) -> list[tuple[str, int, int]]:
    """Phantom CT / T1w / T2w series at 128, 256, 512 and 1024 px (half as many at 1024),
    plus ``n_real`` series of augmented real slices (>= 256 px). Seeds disjoint from the
    negatives'."""
    specs: list[tuple[str, int, int]] = []
    for size in SERIES_SIZES:
        n = n_per_cell if size < 1024 else max(1, n_per_cell // 2)
        for kind in SERIES_KINDS:
            specs += [(kind, size, 2_300_000_000 + size * 1000 + 100 * ("ct", "t1w", "t2w").index(kind) + i)
                      for i in range(n)]
    specs += [(f"real:{i}", 0, 2_400_000_000 + i) for i in range(n_real)]
    return specs


def _rate(flags: list[bool]) -> str:
    k, n = sum(flags), len(flags)
    if not n:
        return "-"
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f} ({lo:.1%} .. {hi:.1%}, n {n})"


def series_summary(pos: list[dict], neg: list[dict], command: str, elapsed: float) -> str:
    from audit.watermark import threshold_for

    thr = threshold_for(1)
    single_neg = [f for r in neg for f in r["single"]]
    series_neg = [r["series"] for r in neg if "series" in r]
    scores = np.array([x for r in neg for x in r["single_score"]] or [np.nan])
    sscores = np.array([r["series_score"] for r in neg if "series" in r] or [np.nan])
    lines = ["# Watermark benchmark: fidelity bound by meaning, sizes 128 - 1024 px, series pooling", "",
             f"Command: `{command}`", "",
             f"Elapsed {elapsed / 60:.1f} min; threshold {thr:.3f} (Bonferroni, FPR <= 0.1 %, 1 key, "
             f"all registered formats); bound: CT {HU_MAX_CHANGE:g} HU, other outputs 2 stored units of 4,096 levels "
             f"and PSNR >= 50 dB (audit.watermark.fidelity.FidelityBound defaults)"
             + (f"; non-HU slices whose mark is not read untransformed raised (doubling) up to {NOISE_FRACTION} x noise sd "
                "(watermark.other_noise_fraction, as the pipeline's embed_verified)" if NOISE_FRACTION else
                "; no raise (watermark.other_noise_fraction = 0)")
             + f"; series of {SERIES_SLICES} slices; marks embedded with format "
             + (f"{EMBED_FMT.version} (bench variant: {EMBED_FMT})" if EMBED_FMT != CURRENT_FORMAT
                else f"{EMBED_FMT.version} (shipped)")
             + ".", "",
             "## False positives (unmarked, no transform)", "",
             f"- single slices: {sum(single_neg)} of {len(single_neg)} flagged, FPR {_rate(single_neg)}; "
             f"score max {scores.max():.2f}, 99.9th percentile {np.quantile(scores, 0.999):.2f}; "
             f"payload decoded {sum(r['decoded'] for r in neg)}",
             f"- series of {SERIES_SLICES} pooled: {sum(series_neg)} of {len(series_neg)} flagged, FPR "
             f"{_rate(series_neg)}; score max {sscores.max() if len(sscores) else float('nan'):.2f}"
             f"; payload decoded {sum(bool(r.get('series_decoded')) for r in neg)}", ""]
    ct_f = [f for r in pos if r["ct"] for f in r["fidelity"]]
    ot_f = [f for r in pos if not r["ct"] for f in r["fidelity"]]
    if ct_f:
        lines.append(f"- fidelity, CT ({len(ct_f)} slices): max |change| {max(float(f['max_change_hu']) for f in ct_f):g} HU, "
                     f"PSNR min {min(float(f['psnr_db']) for f in ct_f):.1f} dB (12-bit range)")
    if ot_f:
        lines.append(f"- fidelity, other ({len(ot_f)} slices): max |change| {max(f['max_change_stored'] for f in ot_f)} "
                     f"stored units, PSNR min {min(float(f['psnr_db']) for f in ot_f):.1f} dB (4,096 levels)")
    lines += ["", "## Detection per transform (TPR %, Wilson 95 %, n)", "",
              "| transform | aim | single slice | series (pooled) | payload single / series | wrong payload |",
              "|---|---|---|---|---|---|"]
    for t in SERIES_TRANSFORMS:
        rs = [r["t"][t] for r in pos]
        single = [f for r in rs for f in r["single"]]
        series = [r["series"] for r in rs]
        pay1 = np.mean([f for r in rs for f in r["single_payload"]])
        pays = np.mean([r["series_payload"] for r in rs])
        lines.append(f"| {t} | {'exempt' if t in EXEMPT else '>= 99 %'} | {_rate(single)} | {_rate(series)} | "
                     f"{100 * pay1:.1f} / {100 * pays:.1f} | {sum(r['wrong_payload'] for r in rs)} |")
    groups = sorted({(r["kind"] if not str(r["kind"]).startswith("real") else "real", r["size"] if not str(r["kind"]).startswith("real") else 0) for r in pos})
    lines += ["", "## Per source and size: single slice / series TPR %", "",
              "| transform | " + " | ".join(f"{k} {s or '256-512'}" for k, s in groups) + " |",
              "|---|" + "---|" * len(groups)]
    for t in SERIES_TRANSFORMS:
        cells = []
        for k, sz in groups:
            rs = [r["t"][t] for r in pos if (r["kind"] == k and r["size"] == sz) or (k == "real" and str(r["kind"]).startswith("real"))]
            if k != "real":
                rs = [r["t"][t] for r in pos if r["kind"] == k and r["size"] == sz]
            single = [f for r in rs for f in r["single"]]
            cells.append(f"{100 * np.mean(single):.0f} / {100 * np.mean([r['series'] for r in rs]):.0f}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def series_main(args: argparse.Namespace) -> None:
    command = "nice -n 10 python bench/bench_watermark.py " + " ".join(sys.argv[1:])
    global NOISE_FRACTION, SERIES_SIZES, SERIES_KINDS, SERIES_SLICES, EMBED_FMT, HU_MAX_CHANGE
    NOISE_FRACTION = args.noise_fraction
    HU_MAX_CHANGE = args.hu_max_change
    SERIES_SIZES = tuple(args.sizes)
    SERIES_KINDS = tuple(args.kinds)
    SERIES_SLICES = args.series_slices
    if args.embed_set:
        import dataclasses

        from audit.watermark.format import MarkFormat

        pairs = (x.split("=", 1) for x in args.embed_set)
        over = {k: type(getattr(CURRENT_FORMAT, k))(v) for k, v in pairs}
        EMBED_FMT = dataclasses.replace(CURRENT_FORMAT, version=90, **over)
        assert isinstance(EMBED_FMT, MarkFormat)
    t0 = time.time()
    pool = mp.get_context("fork").Pool(args.workers)
    specs = series_specs(args.series_per_cell, args.real_series)
    pos = pool.map(run_series, list(enumerate(specs)), chunksize=1)
    print(f"{len(pos)} positive series in {time.time() - t0:.0f}s", flush=True)
    neg: list[dict] = []
    if args.negatives:
        _, negs = build_sets(0, args.negatives, pool)
        groups = [negs[i:i + SERIES_SLICES] for i in range(0, len(negs), SERIES_SLICES)]
        tasks = [(i, g, i < args.negative_series) for i, g in enumerate(groups)]
        neg = pool.map(run_negative_group, tasks, chunksize=8)
        print(f"{len(negs)} negatives in {time.time() - t0:.0f}s", flush=True)
    pool.close()
    if args.json:  # first: a summary problem never loses the run
        args.json.write_text(json.dumps({"pos": pos, "neg": neg}))
    text = series_summary(pos, neg, command, time.time() - t0)
    print(text)
    if args.out:
        args.out.write_text(text)


# ----------------------------------------------------------------------------- fingerprints

FILLER_SLICES = 64  # slices per 128 px filler phantom volume (x CT, T1w, T2w: 192 recorded slices)


def _fp_filler(seed: int) -> list[list[str]]:
    """Fingerprints of one 64-slice 128 px phantom volume (CT in HU with its own noise level,
    T1w, T2w as 12-bit outputs; every tenth seed a head): ledger filler standing for other
    outputs. Every recorded slice is a distinct image (its own anatomy position, seed and
    noise draw); neighbouring slices of a volume resemble each other as in a real series."""
    from audit.watermark.fingerprint import slice_fingerprint
    from engine.research.phantoms import make_sample

    ph = make_sample(seed, size=128, n_slices=FILLER_SLICES,
                     kind="head" if seed % 10 == 9 else "abdomen")
    rng = np.random.default_rng(seed)
    out = []
    for z in range(FILLER_SLICES):
        hu = ph.ct_hu[z] + rng.normal(0.0, rng.uniform(3.0, 20.0), ph.ct_hu[z].shape)
        out.append(slice_fingerprint(np.rint(hu + 1024.0), hu=True, intercept=-1024.0))
        for img in (ph.t1w[z], ph.t2w[z]):
            out.append(slice_fingerprint(_as_output(img, False)[0], hu=False))
    return out


def _fp_positive(args: tuple[int, tuple[str, int, int]]) -> dict[str, object]:
    """One marked output series of the series run: its recorded fingerprints and the query
    hashes (plain + crop search) of every slice after every transform."""
    from audit.watermark.fidelity import FidelityBound
    from audit.watermark.fingerprint import query_hashes, slice_fingerprint

    idx, spec = args
    hosts = _series_hosts(spec)
    bound = FidelityBound()
    payload = make_payload(KEY.key_id, idx)
    rec: dict[str, object] = {"kind": spec[0], "size": int(hosts[0].arr.shape[0]),
                              "recorded": [], "queries": {}}
    for h in hosts:
        d, _ = bound.limits(h.arr, hu=h.ct, slope=h.slope, peak=None if h.ct else 4095)
        m = embed(h.arr, KEY, payload, bits_stored=h.bits, signed=h.signed, max_delta=d)
        rec["recorded"].append(slice_fingerprint(m, hu=h.ct, slope=h.slope,  # type: ignore[attr-defined]
                                                 intercept=h.intercept))
        for ti, name in enumerate(SERIES_TRANSFORMS):
            img = TRANSFORMS[name](h, m, np.random.default_rng([idx, ti]))
            rec["queries"].setdefault(name, []).append([q.hex() for q in query_hashes(img)])  # type: ignore[attr-defined]
    return rec


def _fp_negative(s: Slice) -> list[str]:
    from audit.watermark.fingerprint import query_hashes

    return [q.hex() for q in query_hashes(s.arr)]


_FP_INDEX: Any = None  # the ledger index, inherited by the lookup workers (fork)
_FP_OWNER: Any = None  # per recorded slice: the positive series it belongs to (-1: filler)


def _fp_lookup(args: tuple[int, list[str]]) -> tuple[int, int, int, int]:
    """Plain and searched distance of one query to the closest slice of its own series
    (``owner``; -1: none) and to the closest other slice of the ledger."""
    owner, qs = args
    hs = [bytes.fromhex(q) for q in qs]
    dp = _FP_INDEX._plain(hs[0]).astype(np.int64)
    ds = _FP_INDEX._plain(hs[1]).astype(np.int64)
    for h in hs[2:]:
        ds = np.minimum(ds, _FP_INDEX._plain(h))
    mine = _FP_OWNER == owner
    big = 1 << 20
    return (int(dp[mine].min()) if mine.any() else big, int(dp[~mine].min()),
            int(ds[mine].min()) if mine.any() else big, int(ds[~mine].min()))


def _fp_ledger(pos: list[dict], n: int, pool: Any) -> tuple[Any, list[int]]:
    """The ledger index: the positives' recorded slices, then 128 px phantom filler up to
    ``n`` slices; and per slice the positive series it belongs to (-1: filler)."""
    from audit.watermark.fingerprint import FingerprintIndex

    index = FingerprintIndex()
    owner: list[int] = []
    for i, r in enumerate(pos):
        for z, hs in enumerate(r["recorded"]):
            index.add(i, f"pos-{i}", None, z, hs)
            owner.append(i)
    n_fill = max(0, n - len(index))
    seeds = [2_500_000_000 + v for v in range(-(-n_fill // (3 * FILLER_SLICES)))]
    for v in pool.imap(_fp_filler, seeds, chunksize=2):
        for hs in v:
            if len(index) < n:
                index.add(-1, "filler", None, 0, hs)
                owner.append(-1)
    return index, owner


def _fp_neg_labels(n_neg: int, n_real_series: int) -> list[str]:
    """Per unrelated slice of ``build_sets(0, n_neg)`` (same order): "phantom", "clean" (a real
    slice, or an augmentation of one, whose base is not among the real output series in the
    ledger) or "near" (the base of a real output series in the ledger, or an augmentation of
    it: a flipped / cropped / noisier copy of a recorded image, not an unrelated one)."""
    reals = real_slices()
    big = [r for r in reals if min(r.arr.shape) >= 256]
    in_ledger = {big[k % len(big)].source for k in range(n_real_series)} if big else set()
    n_ph = n_neg * 3 // 10 + n_neg // 25
    out = ["phantom"] * min(n_ph, n_neg)
    for i in range(n_neg - len(out)):
        # the real slices themselves, then build_sets' augmentations of reals[j % len]
        r = reals[i] if i < len(reals) else reals[(i - len(reals)) % len(reals)]
        out.append("near" if r.source in in_ledger else "clean")
    return out


def _fp_tables(pos_r: dict[str, list[tuple[int, ...]]], neg: NDArray, labels: list[str]
               ) -> tuple[int, dict[str, dict], list[tuple[str, str, str, str, float]]]:
    """Penalty, match distance and false matches (set on one half of the unrelated slices
    that are not near-copies of recorded ones, measured on the other half and on the
    near-copies) and the identification rows, for the plain and the searched lookup."""
    lab = np.array(labels)
    unrel, near = neg[lab != "near"], neg[lab == "near"]
    perm = np.random.default_rng(0).permutation(len(unrel))
    calib, test = unrel[perm[: len(perm) // 2]], unrel[perm[len(perm) // 2:]]
    # penalty: the smallest that keeps the unrelated slices' searched distance no closer than
    # their plain one (0.1 % quantile of the calibration half)
    q_plain = np.quantile(calib[:, 0], 0.001)
    pen = next(p for p in range(0, 65) if
               np.quantile(np.minimum(calib[:, 0], calib[:, 1] + p), 0.001) >= q_plain)
    rows, summary = [], {}
    for label, plain in (("plain (dctr1 lookup as before)", True),
                         ("crop search (shipped)", False)):
        def eff(a: NDArray, b: NDArray, plain: bool = plain) -> NDArray:
            return a if plain else np.minimum(a, b + pen)

        e_cal, e_test = eff(calib[:, 0], calib[:, 1]), eff(test[:, 0], test[:, 1])
        e_all, e_near = eff(unrel[:, 0], unrel[:, 1]), eff(near[:, 0], near[:, 1])
        thr = int(np.quantile(e_cal, 0.001, method="lower")) - 1
        false_m = [bool(x <= thr) for x in e_test]
        summary[label] = {
            "thr": thr, "mean": float(e_all.mean()), "sd": float(e_all.std()),
            "false": _rate(false_m), "n_false": int(sum(false_m)),
            "near": _rate([bool(x <= thr) for x in e_near]),
            "q": [float(np.quantile(e_all, q)) for q in (0.001, 0.01, 0.5)],
            "min": int(e_all.min()), "n_cal": len(calib), "n_test": len(test),
            "n_near": len(near)}
        for name in SERIES_TRANSFORMS:
            # per query: own plain, other plain, own searched, other searched
            a = np.array(pos_r[name], dtype=np.int64)
            own, oth = eff(a[:, 0], a[:, 2]), eff(a[:, 1], a[:, 3])
            top1 = [bool(x) for x in own < oth]
            ident = [bool(x) for x in (own < oth) & (own <= thr)]
            rows.append((name, label, _rate(ident), _rate(top1), float(np.median(own))))
    return pen, summary, rows


def _fp_report_lines(pen: int, summary: dict[str, dict],
                     rows: list[tuple[str, str, str, str, float]]) -> list[str]:
    lines = ["- crop search penalty (smallest keeping the unrelated slices' searched distance "
             f"no closer than their plain one at the 0.1 % quantile): {pen} bits", ""]
    for label, v in summary.items():
        lines.append(
            f"- {label}: closest recorded slice of an unrelated slice (phantom and real, "
            f"near-copies left out; {v['n_cal'] + v['n_test']}): distance min {v['min']}, "
            f"0.1 % quantile {v['q'][0]:.0f}, 1 % {v['q'][1]:.0f}, median {v['q'][2]:.0f}, "
            f"mean {v['mean']:.1f}, sd {v['sd']:.1f}; match distance chosen on {v['n_cal']} "
            f"(false-match rate <= 0.1 %): <= {v['thr']} bits; false matches on the other "
            f"{v['n_test']}: {v['n_false']}, rate {v['false']}; near-copies of recorded real "
            f"slices (flips / crops / noise of the same source slice; {v['n_near']}) within "
            f"the match distance: {v['near']}")
    lines += [
        "", "Identified = the right output series is strictly closer than every other recorded "
        "slice (ties count as misses) and within the match distance; top-1 = strictly closer, "
        "any distance.", "",
        "| transform | mark aim | lookup | identified | top-1 (any distance) | median distance "
        "to own slice |", "|---|---|---|---|---|---|"]
    for name, label, ident, top1, med in sorted(
            rows, key=lambda r: (SERIES_TRANSFORMS.index(r[0]), r[1])):
        aim = "exempt" if name in EXEMPT else ">= 99 %"
        lines.append(f"| {name} | {aim} | {label} | {ident} | {top1} | {med:.0f} |")
    return lines


def fingerprint_report(path: Path, n_neg: int, n_real_series: int) -> str:
    """The tables of a ``--fingerprint --json`` dump, recomputed (``--fingerprint-report``)."""
    d = json.loads(path.read_text())
    neg = np.array(d["neg"])
    labels = d.get("labels") or _fp_neg_labels(n_neg, n_real_series)
    pen, summary, rows = _fp_tables(d["pos"], neg, labels)
    return "\n".join(_fp_report_lines(pen, summary, rows)) + "\n"


def fingerprint_main(args: argparse.Namespace) -> None:
    """Identification by fingerprint: rate per transform (exempt ones included) for the marked
    output series of the series run, false matches of unrelated real and phantom slices, and
    lookup time, against a ledger of ``--ledger`` recorded slices (the positives' slices plus
    distinct 128 px phantom output slices). Plain lookup (scheme dctr1 as recorded) and the
    crop search (audit.watermark.fingerprint.query_hashes) are both measured; the penalty and
    the match distance are chosen on one half of the unrelated slices and the false-match rate
    measured on the other half."""
    global _FP_INDEX, _FP_OWNER
    from audit.watermark import fingerprint as fpm

    command = "nice -n 10 python bench/bench_watermark.py " + " ".join(sys.argv[1:])
    t0 = time.time()
    pool = mp.get_context("fork").Pool(args.workers)
    specs = series_specs(args.series_per_cell, args.real_series)
    pos: list[dict[str, Any]] = pool.map(_fp_positive, list(enumerate(specs)), chunksize=1)
    print(f"{len(pos)} positive series in {time.time() - t0:.0f}s", flush=True)
    index, owner = _fp_ledger(pos, args.ledger, pool)
    print(f"ledger of {len(index)} fingerprints in {time.time() - t0:.0f}s", flush=True)
    _, negs = build_sets(0, args.negatives, pool)
    neg_q = pool.map(_fp_negative, negs, chunksize=32)
    pool.close()
    print(f"{len(neg_q)} negatives hashed in {time.time() - t0:.0f}s", flush=True)
    index._words()
    _FP_INDEX, _FP_OWNER = index, np.array(owner)
    jobs = [(i, q) for i, r in enumerate(pos) for name in SERIES_TRANSFORMS
            for q in r["queries"][name]]
    jobs += [(-2, q) for q in neg_q]
    with mp.get_context("fork").Pool(args.workers) as lp:
        res = lp.map(_fp_lookup, jobs, chunksize=64)
    print(f"lookups done in {time.time() - t0:.0f}s", flush=True)
    n_pos = len(jobs) - len(neg_q)
    neg = np.array([(r[1], r[3]) for r in res[n_pos:]])  # plain, searched: closest other slice
    pos_r: dict[str, list[tuple[int, ...]]] = {n: [] for n in SERIES_TRANSFORMS}
    k = 0
    for r in pos:
        for name in SERIES_TRANSFORMS:
            for _ in r["queries"][name]:
                pos_r[name].append(res[k])
                k += 1
    labels = _fp_neg_labels(len(negs), args.real_series)
    pen, summary, rows = _fp_tables(pos_r, neg, labels)
    t_hash, t_look = [], []  # the shipped search at this ledger size, one core
    for s in negs[:200]:
        t = time.perf_counter()
        qs = fpm.query_hashes(s.arr)
        t_hash.append(time.perf_counter() - t)
        t = time.perf_counter()
        index.search_hash(qs, 5)
        t_look.append(time.perf_counter() - t)
    n_rec = sum(len(r["recorded"]) for r in pos)
    lines = [
        "# Identification by perceptual fingerprint (scheme dctr1, crop search)", "",
        f"Command: `{command}`", "",
        f"Elapsed {(time.time() - t0) / 60:.1f} min. Ledger: {len(index)} recorded slices, "
        f"4 renderings each: {n_rec} of the marked output series below and "
        f"{len(index) - n_rec} distinct 128 px phantom output slices ({FILLER_SLICES}-slice "
        "volumes, CT / T1w / T2w, one seed each). Unrelated slices: "
        f"{len(neg)} (held-out phantom seeds at 256 / 512 px, the distinct real pydicom / "
        "pydicom-data slices and their augmentations).", "",
        f"- shipped lookup at {len(index)} recorded slices (one core, numpy; "
        f"{1 + len(fpm.UNCROP_PADS)} hashes per query): hashing the query median "
        f"{1000 * np.median(t_hash):.1f} ms (99th percentile {1000 * np.quantile(t_hash, 0.99):.1f}"
        f" ms, 256 - 512 px), search median {1000 * np.median(t_look):.1f} ms (99th percentile "
        f"{1000 * np.quantile(t_look, 0.99):.1f} ms)", ""]
    lines += _fp_report_lines(pen, summary, rows)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"neg": neg.tolist(), "penalty": pen, "labels": labels,
                                         "summary": summary, "pos": pos_r}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positives", type=int, default=3000)
    ap.add_argument("--negatives", type=int, default=10000)
    ap.add_argument("--transformed-negatives", type=int, default=300)
    ap.add_argument("--slow", type=int, default=150, help="positives also run through regeneration")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/watermark.md"))
    ap.add_argument("--json", type=Path, default=None, help="raw per-slice results (not committed)")
    ap.add_argument("--mini", action="store_true", help="fast mini-benchmark (see mini()); ignores the rest")
    ap.add_argument("--max-delta", type=int, default=None,
                    help="fidelity bound for HU-calibrated CT positives (others: max(N, 0.25 x noise sd)); "
                         "default: the shipped rule (2 HU)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="--mini only: override a constant of audit.watermark.core / .pattern (variant runs)")
    ap.add_argument("--no-negatives", action="store_true", help="--mini only: skip the 1,000 negatives")
    ap.add_argument("--sweep-report", type=Path, nargs="+", default=None, metavar="JSON",
                    help="table (and --png plot) from --mini --max-delta N --json dumps; ignores the rest")
    ap.add_argument("--png", type=Path, default=None, help="--sweep-report: plot file")
    ap.add_argument("--flat-survival", action="store_true",
                    help="table: part of the mark kept by 8-bit windows / JPEG on a flat host; ignores the rest")
    ap.add_argument("--series", action="store_true",
                    help="series run at the fidelity bound by meaning, 128 - 1024 px, single and pooled")
    ap.add_argument("--series-per-cell", type=int, default=12, help="--series: phantom series per kind and size")
    ap.add_argument("--real-series", type=int, default=40, help="--series: series of augmented real slices")
    ap.add_argument("--negative-series", type=int, default=1000, help="--series: negatives also pooled in 4s")
    ap.add_argument("--noise-fraction", type=float, default=0.0,
                    help="--series: non-HU slices not read at 2 units raised up to this x noise sd (watermark.other_noise_fraction)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024],
                    help="--series: phantom sizes")
    ap.add_argument("--kinds", nargs="+", default=["ct", "t1w", "t2w"],
                    help="--series: phantom kinds")
    ap.add_argument("--hu-max-change", type=float, default=4.0,
                    help="--series: CT bound in HU (what-if; the shipped bound is 4)")
    ap.add_argument("--series-slices", type=int, default=4,
                    help="--series: slices per series (pooled)")
    ap.add_argument("--embed-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="--series: embed with a MarkFormat variant (bench version 90); "
                         "the detector is the shipped one")
    ap.add_argument("--fingerprint", action="store_true",
                    help="identification by fingerprint against --ledger recorded slices")
    ap.add_argument("--fingerprint-report", type=Path, default=None, metavar="JSON",
                    help="the tables of a --fingerprint --json dump, recomputed (give the run's "
                         "--negatives and --real-series)")
    ap.add_argument("--ledger", type=int, default=100_000, help="--fingerprint: recorded slices")
    args = ap.parse_args()
    if args.fingerprint_report:
        print(fingerprint_report(args.fingerprint_report, args.negatives, args.real_series))
        return
    if args.fingerprint:
        fingerprint_main(args)
        return
    if args.series:
        series_main(args)
        return
    if args.flat_survival:
        print(flat_survival())
        return
    if args.sweep_report:
        print(sweep_report(args.sweep_report, args.png))
        return
    if args.mini:
        mini(args.max_delta, tuple(args.set), args.json, negatives=not args.no_negatives)
        return
    command = "nice -n 10 python bench/bench_watermark.py " + " ".join(sys.argv[1:])
    global MAX_DELTA
    MAX_DELTA = args.max_delta
    t0 = time.time()
    pool = mp.get_context("fork").Pool(args.workers)
    pos, neg = build_sets(args.positives, args.negatives, pool)
    n_real = len(real_slices())
    print(f"built {len(pos)} positives, {len(neg)} negatives in {time.time() - t0:.0f}s", flush=True)
    stride = max(1, len(pos) // max(1, args.slow))
    pos_jobs = [(i, s, args.slow > 0 and i % stride == 0) for i, s in enumerate(pos)]
    step = max(1, len(neg) // max(1, args.transformed_negatives))
    neg_jobs = [(i, s, i % step == 0) for i, s in enumerate(neg)]
    with pool:
        pos_res = pool.map(run_positive, pos_jobs, chunksize=8)
        print(f"positives done at {time.time() - t0:.0f}s", flush=True)
        neg_res = pool.map(run_negative, neg_jobs, chunksize=32)
    elapsed = time.time() - t0
    thr = wm_core.threshold_for(1)
    report = summarise(pos_res, neg_res, thr, command, elapsed, n_real)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    if args.json:
        args.json.write_text(json.dumps({"positives": pos_res, "negatives": neg_res}))
    print(report)


if __name__ == "__main__":
    main()
