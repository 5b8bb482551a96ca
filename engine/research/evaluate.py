"""Evaluation of restoration / synthesis methods on held-out data, with a Markdown + PNG report.

A *method* is any callable ``Volume -> Volume`` (the engine's models through
:func:`model_method`, the classical baselines of :mod:`engine.research.baselines`, the identity).
Every
method sees the same :class:`Case` list (input, reference, optional labels and lesion mask)
and is scored with :mod:`engine.research.metrics`:

* CT (``ct_denoise``): PSNR on -1000..1000 HU, SSIM on the -160..240 HU window, MAE in HU over
  the body, residual noise SD in flat tissue interiors, lesion contrast ratio and lesion Dice.
* MR (``mr_denoise``, ``ct_to_mr``): PSNR / SSIM on 0..p99.9 of the reference (whole image and
  body only), MAE over the body, noise SD, ROI SSIM (liver / brain / lesions), lesion metrics.

* Augmentation (``augment``): every method returns N variants of the received normal-dose
  CT (:func:`run_augment_section`, :func:`score_variants`): how far they move from the input
  (MAE, SSIM), how much they vary (SD across variants, also after smoothing: variation beyond
  pixel noise), whether the anatomy stays (body and bone Dice), lesions stay (contrast ratio,
  Dice) and none are added (false lesions), and whether the scan's texture stays (texture
  ratio).

Held-out phantoms come from the *test* split of :mod:`engine.research.phantoms` (seeds
``2e9 + i``), never from the training split. Low-dose inputs:
:func:`engine.research.degrade.low_dose_ct`
with ``seed = phantom seed``; MR noise: :func:`engine.research.degrade.mr_noise` at ``snr``.
"""
from __future__ import annotations

import json
import logging
import math
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from engine.research import metrics as M
from engine.research.phantoms import Tissue
from engine.types import Intensity, TaskName, Volume

log = logging.getLogger(__name__)

Method = Callable[[Volume], Volume]
#: augmentation: a received volume -> its variants
VariantsMethod = Callable[[Volume], list[Volume]]
EVAL_TASKS = (TaskName.CT_DENOISE, TaskName.MR_DENOISE, TaskName.CT_TO_MR, TaskName.AUGMENT)
#: augmentation metrics: body = HU above this, bone = (0.75 px smoothed) HU above that
BODY_HU, BONE_HU = -500.0, 300.0
#: augmentation: Gaussian sigma (px) of the "structural" variation (pixel noise averaged out)
#: and of the high-pass whose SD in flat tissue is the texture measure
STRUCT_SIGMA, TEXTURE_SIGMA = 2.0, 1.5
#: augmentation: SSIM to the input inside these tissues (labels), where the anatomy is low-contrast
AUG_ROIS = {"brain": (Tissue.CSF, Tissue.GM, Tissue.WM), "liver": (Tissue.LIVER,)}
#: tissues whose interiors count as "flat" for the residual-noise SD
FLAT_TISSUES = (
    Tissue.FAT,
    Tissue.MUSCLE,
    Tissue.LIVER,
    Tissue.KIDNEY,
    Tissue.SPLEEN,
    Tissue.GM,
    Tissue.WM,
)
#: ROI SSIM of the restoration / CT->MR reports
ROI_NAMES = {"liver": (Tissue.LIVER,), "brain": (Tissue.GM, Tissue.WM)}
VESSEL = Tissue.VESSEL  # excluded from the lesion ring
AIR = Tissue.AIR  # outside the body
#: CT->MR lesion split: a lesion whose contrast in the received CT (core minus ring, as in
#: engine.research.metrics.lesion_scores) is below this many HU is "CT-occult": below the phantom's
#: grey / white matter contrast (12 HU), so attenuation alone cannot tell it from anatomy and a
#: CT->MR model has nothing to draw it from (many brain lesions are CT-occult, MR-visible)
CT_VISIBLE_HU = 10.0


def _min_contrast(case: Case) -> float:
    """Reference lesions below this contrast do not set the false-lesion threshold: CT_VISIBLE_HU
    for CT references (engine.research.metrics.false_lesion_map), none for MR."""
    return CT_VISIBLE_HU if case.reference.intensity == Intensity.HU else 0.0


@dataclass
class Case:
    """One held-out example: what the method gets and what it should produce."""

    name: str
    input: Volume
    reference: Volume
    labels: np.ndarray | None = None
    lesion_mask: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Section:
    """Results of several methods on one list of cases."""

    title: str
    task: str
    description: str
    per_case: dict[str, list[dict[str, float]]]  # method -> one metrics dict per case
    pictures: list[str] = field(default_factory=list)

    def mean(self, method: str) -> dict[str, float]:
        rows = self.per_case[method]
        keys = sorted({k for r in rows for k in r})
        out: dict[str, float] = {}
        for k in keys:
            vals = [r[k] for r in rows if k in r and not math.isnan(r[k])]
            out[k] = float(np.mean(vals)) if vals else math.nan
        return out


# --------------------------------------------------------------------------- cases


def phantom_cases(task: str, n: int, size: int = 256, n_slices: int = 3, dose: float = 0.25,
                  snr: float = 15.0, target: str = "t1w", kind: str = "mixed",
                  split: str = "test", start: int = 0,
                  cache_dir: Path | str | None = None) -> list[Case]:
    """Held-out phantom cases for ``task`` (``EVAL_TASKS``).

    ct_denoise  input low-dose CT at ``dose``, reference the noise-free phantom CT
    mr_denoise  input Rician-noised MR at ``snr`` (``target`` t1w / t2w / both alternating),
                reference the noise- and bias-free MR
    ct_to_mr    input the normal-dose CT (dose 1.0 simulation), reference the noise- and
                bias-free ``target`` MR
    augment     input the normal-dose CT (dose 1.0 simulation, what a modality sends),
                reference the noise-free phantom CT
    """
    from engine.research.degrade import low_dose_ct, mr_noise
    from engine.research.phantoms import PHANTOM_VERSION, iter_dataset

    if task not in EVAL_TASKS:
        raise ValueError(f"task must be one of {EVAL_TASKS}, got {task!r}")
    cache: Path | None = None
    if cache_dir is not None:
        key = (f"{task}-n{n}-s{size}-z{n_slices}-d{dose:g}-snr{snr:g}-{target}-{kind}-{split}"
               f"-{start}-v{PHANTOM_VERSION}")
        cache = Path(cache_dir) / f"{key}.npz"
        if cache.exists():
            return load_cases(cache)
    cases = []
    for i, s in enumerate(iter_dataset(split, n, size=size, n_slices=n_slices, kind=kind,  # type: ignore[arg-type]
                                       start=start, mr_snr=None, bias_strength=0.0)):
        info = {"seed": s.seed, "kind": s.kind, "split": split, "size": size,
                "n_slices": n_slices, "lesion_diameters_mm": [round(les.diameter_mm, 1)
                                                              for les in s.lesions]}
        if task == TaskName.CT_DENOISE:
            ld = low_dose_ct(s.ct_hu, s.spacing[1], dose, seed=s.seed)
            inp, ref = Volume(ld, s.spacing, Intensity.HU), Volume(s.ct_hu, s.spacing, Intensity.HU)
            info["dose"] = dose
        elif task == TaskName.MR_DENOISE:
            w = target if target in ("t1w", "t2w") else ("t1w" if i % 2 == 0 else "t2w")
            clean = getattr(s, w)
            ity = Intensity.MR_T1W if w == "t1w" else Intensity.MR_T2W
            noisy = mr_noise(clean, snr, seed=s.seed, mask=s.labels != AIR).astype(np.float32)
            inp, ref = Volume(noisy, s.spacing, ity), Volume(clean, s.spacing, ity)
            info.update(snr=snr, weighting=w)
        elif task == TaskName.AUGMENT:
            nd = low_dose_ct(s.ct_hu, s.spacing[1], 1.0, seed=s.seed)
            inp, ref = Volume(nd, s.spacing, Intensity.HU), Volume(s.ct_hu, s.spacing, Intensity.HU)
            info["dose"] = 1.0
        else:
            nd = low_dose_ct(s.ct_hu, s.spacing[1], 1.0, seed=s.seed)
            ity = Intensity.MR_T1W if target == "t1w" else Intensity.MR_T2W
            inp = Volume(nd, s.spacing, Intensity.HU)
            ref = Volume(getattr(s, target), s.spacing, ity)
            info["target"] = target
        cases.append(Case(f"{split}-{s.seed}-{s.kind}", inp, ref, s.labels, s.lesion_mask, info))
    if cache is not None:
        save_cases(cases, cache)
    return cases


def save_cases(cases: Sequence[Case], path: Path) -> None:
    """Cache cases (the low-dose simulation at 512 px costs seconds per slice)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {}  # name -> array (Any: np.savez's keywords include allow_pickle)
    meta = []
    for i, c in enumerate(cases):
        arrays[f"in{i}"], arrays[f"ref{i}"] = c.input.data, c.reference.data
        if c.labels is not None:
            arrays[f"lab{i}"] = c.labels
        if c.lesion_mask is not None:
            arrays[f"les{i}"] = c.lesion_mask
        meta.append({"name": c.name, "info": c.info, "spacing": c.input.spacing,
                     "in": c.input.intensity.value, "ref": c.reference.intensity.value})
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, meta=np.array(json.dumps(meta)), **arrays)
    tmp.replace(path)


def load_cases(path: Path) -> list[Case]:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        out = []
        for i, m in enumerate(meta):
            sp = tuple(m["spacing"])
            out.append(Case(m["name"], Volume(z[f"in{i}"], sp, Intensity(m["in"])),
                            Volume(z[f"ref{i}"], sp, Intensity(m["ref"])),
                            z[f"lab{i}"] if f"lab{i}" in z.files else None,
                            z[f"les{i}"] if f"les{i}" in z.files else None, m["info"]))
    log.info("loaded %d cached cases from %s", len(out), path)
    return out


# --------------------------------------------------------------------------- scoring


def score(case: Case, output: Volume) -> dict[str, float]:
    """All metrics of one output against its case's reference."""
    ref, out = case.reference.data, output.data
    if out.shape != ref.shape:
        raise ValueError(f"{case.name}: output shape {out.shape} != reference {ref.shape}")
    is_ct = case.reference.intensity == Intensity.HU
    if case.labels is not None:
        body = case.labels != AIR
        flat = M.flat_mask_from_labels(case.labels, FLAT_TISSUES)
    else:
        body = (ref > -500) if is_ct else (ref > 0.1 * np.percentile(ref, 99))
        flat = (
            M.flat_mask_from_reference(ref)
            if is_ct
            else M.flat_mask_from_reference(
                ref,
                (0.1 * float(np.percentile(ref, 99)), math.inf),
                max_gradient=0.02 * float(np.percentile(ref, 99)),
            )
        )
    res: dict[str, float] = {}
    if is_ct:
        res["psnr"] = M.psnr(ref, out, M.CT_RANGE)
        res["ssim"] = M.ssim(ref, out, M.CT_WINDOW)
        res["mae_hu"] = M.mae(ref, out, body)
    else:
        rg = M.mr_range(ref)
        res["psnr"] = M.psnr(ref, out, rg)
        smap = M.ssim_map(ref, out, rg)
        res["ssim"] = float(smap.mean())
        res["ssim_body"] = float(smap[body].mean())
        res["mae"] = M.mae(ref, out, body)
        if case.labels is not None:
            for name, tissues in ROI_NAMES.items():
                roi = np.isin(case.labels, tissues)
                if roi.any():
                    res[f"ssim_{name}"] = float(smap[roi].mean())
            if case.lesion_mask is not None and (case.lesion_mask > 0).any():
                res["ssim_lesions"] = float(smap[case.lesion_mask > 0].mean())
    res["noise_sd"] = M.noise_sd(ref, out, flat)
    if case.lesion_mask is not None and (case.lesion_mask > 0).any():
        excl = case.labels == VESSEL if case.labels is not None else None
        scores = M.lesion_scores(ref, out, case.lesion_mask, case.reference.spacing, exclude=excl)
        for k, v in M.summarize_lesions(
            scores, visible_contrast=CT_VISIBLE_HU if is_ct else None
        ).items():
            res[f"lesion_{k}"] = v
        res["false_lesions_per_slice"] = M.false_lesions(
            ref,
            out,
            case.lesion_mask,
            case.reference.spacing,
            body,
            excl,
            min_contrast=_min_contrast(case),
        )
        if (case.input.intensity == Intensity.HU) == is_ct:  # restoration: relative to input
            in_scores = M.lesion_scores(ref, case.input.data, case.lesion_mask,
                                        case.reference.spacing, exclude=excl)
            for k, v in M.kept_vs_input(scores, in_scores,
                                        CT_VISIBLE_HU if is_ct else 0.0).items():
                res[f"lesion_{k}"] = v
        if (
            case.input.intensity == Intensity.HU and not is_ct
        ):  # CT->MR: can the CT show the lesion?
            ct_contrast = {s.index: s.contrast_ref for s in
                           M.lesion_scores(case.input.data, case.input.data, case.lesion_mask,
                                           case.reference.spacing, exclude=excl)}
            for key, keep in (("ct_visible", lambda c: abs(c) >= CT_VISIBLE_HU),
                              ("ct_occult", lambda c: abs(c) < CT_VISIBLE_HU)):
                sel = [s.dice for s in scores if s.diameter_mm >= 5.0 and s.index in ct_contrast
                       and keep(ct_contrast[s.index])]
                res[f"lesion_dice_ge5mm_{key}"] = float(np.mean(sel)) if sel else math.nan
                res[f"lesion_n_ge5mm_{key}"] = float(len(sel))
    return res


# --------------------------------------------------------------------------- pictures


def _to_u8(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((img - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _display_range(v: Volume, ref: Volume) -> tuple[float, float]:
    if v.intensity == Intensity.HU:
        return M.CT_WINDOW
    return 0.0, float(np.percentile(ref.data, 99.5)) or 1.0


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


#: outline colours in the pictures: true lesions (reference tile), false lesions (output tile)
LESION_RGB, FALSE_LESION_RGB = (0, 200, 0), (255, 40, 40)


def _outline(mask: np.ndarray, tile: int) -> np.ndarray:
    """One-pixel outline of ``mask`` at ``tile`` x ``tile`` (nearest-neighbour resize)."""
    m = (
        np.asarray(
            Image.fromarray(mask.astype(np.uint8) * 255).resize(
                (tile, tile), Image.Resampling.NEAREST
            )
        )
        > 0
    )
    return m & ~ndimage.binary_erosion(m)


def picture(case: Case, outputs: dict[str, Volume], path: Path, tile: int = 256) -> Path:
    """Grid PNG of the centre slice: one row per method, input | output | reference | difference.

    CT in the soft-tissue window (-160..240 HU), MR on 0..p99.5 of the reference; the
    difference (output - reference) is mid-grey at 0 and saturates at +/- 1/4 of that range.
    With a lesion mask: the true lesions are outlined green on the reference, and the output's
    false lesions (:func:`engine.research.metrics.false_lesion_map`, the "false lesions / slice"
    column)
    red on the output.
    """
    k = case.reference.data.shape[0] // 2
    ref = case.reference.data[k]
    head = 18
    cols = ("input", "output", "reference", "difference")
    width = tile * len(cols)
    height = head + len(outputs) * (tile + head)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(13)
    for j, c in enumerate(cols):
        draw.text((j * tile + 4, 2), c, fill=(255, 255, 255), font=font)
    in_lo, in_hi = _display_range(case.input, case.input)
    ref_lo, ref_hi = _display_range(case.reference, case.reference)
    span = (ref_hi - ref_lo) / 4
    les = case.lesion_mask if case.lesion_mask is not None and case.lesion_mask.any() else None
    body = case.labels != AIR if case.labels is not None else None
    excl = case.labels == VESSEL if case.labels is not None else None
    for r, (name, out) in enumerate(outputs.items()):
        y0 = head + r * (tile + head)
        draw.text((4, y0 + 2), name, fill=(255, 255, 255), font=font)
        o = out.data[k]
        tiles = [_to_u8(case.input.data[k], in_lo, in_hi), _to_u8(o, ref_lo, ref_hi),
                 _to_u8(ref, ref_lo, ref_hi), _to_u8(o - ref, -span, span)]
        rgb = [
            np.asarray(
                Image.fromarray(t).resize((tile, tile), Image.Resampling.LANCZOS).convert("RGB")
            ).copy()
            for t in tiles
        ]
        if les is not None:
            rgb[2][_outline(les[k] > 0, tile)] = LESION_RGB
            fl = M.false_lesion_map(
                case.reference.data,
                out.data,
                les,
                case.reference.spacing,
                body,
                excl,
                min_contrast=_min_contrast(case),
            )
            if fl is not None and fl[k].any():
                rgb[1][_outline(fl[k] > 0, tile)] = FALSE_LESION_RGB
        for j, t in enumerate(rgb):
            canvas.paste(Image.fromarray(t), (j * tile, y0 + head))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    return path


def lesion_picture(case: Case, outputs: dict[str, Volume], path: Path, max_lesions: int = 4,
                   tile: int = 128) -> Path | None:
    """Zoomed crops of up to ``max_lesions`` lesions, one row each (smallest first), columns
    input | each method | reference, in a narrow window around each lesion so that contrast
    lost or kept is visible: centred on the reference's median outside the lesion, +/- 2x the
    lesion's reference contrast. Under each output tile: its contrast ratio for that lesion
    (engine.research.metrics.lesion_scores). CT references: only lesions of >= CT_VISIBLE_HU.
    Returns
    None when the case has no such lesion.
    """
    les = case.lesion_mask
    if les is None or not les.any():
        return None
    ref = case.reference.data
    excl = case.labels == VESSEL if case.labels is not None else None
    sp = case.reference.spacing
    own = [s for s in M.lesion_scores(ref, ref, les, sp, exclude=excl)
           if abs(s.contrast_ref) >= _min_contrast(case) and s.contrast_ref != 0]
    if not own:
        return None
    own = sorted(own, key=lambda s: s.diameter_mm)
    if len(own) > max_lesions:  # spread over the sizes, smallest and largest kept
        own = [own[round(i)] for i in np.linspace(0, len(own) - 1, max_lesions)]
    ratios = {
        name: {
            s.index: s.contrast_ratio for s in M.lesion_scores(ref, out.data, les, sp, exclude=excl)
        }
        for name, out in outputs.items()
    }
    names = list(outputs)
    cols = ["input", *names, "reference"]
    head, foot = 30, 16
    canvas = Image.new("RGB", (tile * len(cols), head + len(own) * (tile + foot)), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(11)
    for j, c in enumerate(cols):
        lines = textwrap.wrap(c, max(8, tile // 6))  # at most two short lines per column header
        draw.text((j * tile + 3, 2), "\n".join(lines[:2]), fill=(255, 255, 255), font=font)
    same_units = case.input.intensity == case.reference.intensity
    for r, sc in enumerate(own):
        m = les == sc.index
        k = int(np.argmax(m.sum(axis=(1, 2))))
        yy, xx = np.nonzero(m[k])
        cy, cx = int(yy.mean()), int(xx.mean())
        half = max(12, int(2.0 * sc.diameter_mm / sp[1]))
        box = (slice(max(cy - half, 0), cy + half), slice(max(cx - half, 0), cx + half))
        outside = ~m[k][box]
        bg = float(np.median(ref[k][box][outside]))
        w = 2.0 * abs(sc.contrast_ref)
        in_img = case.input.data[k][box]
        in_lo, in_hi = ((bg - w, bg + w) if same_units else
                        (float(np.percentile(in_img, 1)), float(np.percentile(in_img, 99)) + 1e-6))
        imgs = [(in_img, in_lo, in_hi, "")]
        imgs += [
            (outputs[n].data[k][box], bg - w, bg + w, f"x{ratios[n].get(sc.index, math.nan):.2f}")
            for n in names
        ]
        imgs.append(
            (ref[k][box], bg - w, bg + w, f"{sc.diameter_mm:.1f} mm, {sc.contrast_ref:+.0f}")
        )
        y0 = head + r * (tile + foot)
        for j, (img, lo, hi, label) in enumerate(imgs):
            t = (
                Image.fromarray(_to_u8(img, lo, hi))
                .resize((tile, tile), Image.Resampling.NEAREST)
                .convert("RGB")
            )
            arr = np.asarray(t).copy()
            if j == len(imgs) - 1:
                arr[_outline(m[k][box], tile)] = LESION_RGB
            canvas.paste(Image.fromarray(arr), (j * tile, y0))
            draw.text((j * tile + 3, y0 + tile + 1), label, fill=(255, 255, 255), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    return path


# --------------------------------------------------------------------------- evaluation


def run_section(title: str, task: str, cases: Sequence[Case], methods: dict[str, Method],
                out_dir: Path | str, description: str = "", n_pictures: int = 2,
                include_input: bool = True) -> Section:
    """Score every method on every case; write pictures of the first ``n_pictures`` cases.

    ``include_input`` also scores the unprocessed input (for restoration) as a reference row.
    Each method's wall time per slice is recorded as ``sec_per_slice``.
    """
    out_dir = Path(out_dir)
    per_case: dict[str, list[dict[str, float]]] = {}
    all_methods: dict[str, Method] = {}
    if include_input and task != TaskName.CT_TO_MR:
        all_methods["input (no processing)"] = lambda v: v
    all_methods.update(methods)
    pics = []
    slug = "".join(ch if ch.isalnum() else "_" for ch in title.lower()).strip("_")
    for ci, case in enumerate(cases):
        outputs: dict[str, Volume] = {}
        for name, fn in all_methods.items():
            t0 = time.perf_counter()
            out = fn(case.input)
            dt = time.perf_counter() - t0
            if not isinstance(out, Volume):
                raise TypeError(f"method {name!r} returned {type(out).__name__}, not Volume")
            row = score(case, out)
            row["sec_per_slice"] = dt / case.input.data.shape[0]
            per_case.setdefault(name, []).append(row)
            outputs[name] = out
            log.info("%s %s %s: %s", title, case.name, name,
                     {k: round(v, 4) for k, v in row.items() if k in ("psnr", "ssim")})
        if ci < n_pictures:
            shown = {k: v for k, v in outputs.items() if not k.startswith("input")} or outputs
            p = picture(case, shown, out_dir / f"{slug}_{ci}.png")
            pics.append(p.name)
            lp = lesion_picture(case, shown, out_dir / f"{slug}_{ci}_lesions.png")
            if lp is not None:
                pics.append(lp.name)
    return Section(title, task, description, per_case, pics)


_COLUMNS = [
    ("psnr", "PSNR dB", 2),
    ("ssim", "SSIM", 4),
    ("ssim_body", "SSIM body", 4),
    ("mae_hu", "MAE HU", 1),
    ("mae", "MAE", 1),
    ("noise_sd", "noise SD", 1),
    ("ssim_liver", "SSIM liver", 4),
    ("ssim_brain", "SSIM brain", 4),
    ("ssim_lesions", "SSIM lesions", 4),
    ("lesion_contrast_ratio", "lesion contrast ratio", 3),
    ("lesion_contrast_ratio_ge5mm", "contrast ratio >= 5 mm", 3),
    ("lesion_contrast_within_10pct", "lesions within 10 %", 2),
    ("lesion_contrast_error", "lesion contrast error", 2),
    ("lesion_contrast_ratio_visible", "contrast ratio, >= 10 HU lesions", 3),
    ("lesion_contrast_within_10pct_visible", "within 10 %, >= 10 HU lesions", 2),
    ("lesion_contrast_within_10pct_ge5mm_visible", "within 10 %, >= 10 HU, >= 5 mm", 2),
    ("lesion_contrast_within_10pct_lt5mm_visible", "within 10 %, >= 10 HU, < 5 mm", 2),
    ("lesion_kept_vs_input", "lesions kept (>= 90 % of input contrast)", 2),
    ("lesion_contrast_ratio_to_input", "contrast ratio to input", 3),
    ("lesion_dice_ge5mm", "Dice >= 5 mm", 3),
    ("lesion_dice_lt5mm", "Dice < 5 mm", 3),
    ("lesion_dice_ge5mm_ct_visible", "Dice >= 5 mm, CT-visible (target)", 3),
    ("lesion_dice_ge5mm_ct_occult", "Dice >= 5 mm, CT-occult", 3),
    ("false_lesions_per_slice", "false lesions / slice", 2),
    ("mae_to_input", "MAE to input HU", 1),
    ("ssim_to_input", "SSIM to input", 4),
    ("ssim_to_input_brain", "SSIM to input, brain", 4),
    ("ssim_to_input_liver", "SSIM to input, liver", 4),
    ("variant_sd", "SD across variants HU", 1),
    ("structural_sd", "SD across variants, smoothed HU", 1),
    ("body_dice", "body Dice", 4),
    ("bone_dice", "bone Dice", 4),
    ("texture_ratio", "texture ratio", 2),
    ("sec_per_slice", "s / slice", 3),
]


def section_markdown(sec: Section) -> str:
    """Markdown table (means over cases) plus picture links."""
    means = {m: sec.mean(m) for m in sec.per_case}
    cols = [
        c for c in _COLUMNS if any(c[0] in v and not math.isnan(v[c[0]]) for v in means.values())
    ]
    n = len(next(iter(sec.per_case.values()))) if sec.per_case else 0
    lines = [f"## {sec.title}", "", sec.description, "", f"Mean over {n} case(s).", "",
             "| method | " + " | ".join(c[1] for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for m, v in means.items():
        cells = []
        for key, _, nd in cols:
            x = v.get(key, math.nan)
            cells.append("-" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.{nd}f}"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    for p in sec.pictures:
        lines += [f"![{sec.title}]({p})", ""]
    return "\n".join(lines)


CONVENTIONS = """\
Metric conventions: CT PSNR on -1000..1000 HU (data range 2000), CT SSIM on the -160..240 HU
window (data range 400, Gaussian window sigma 1.5); MR PSNR / SSIM on 0..p99.9 of the
reference; MAE over the body; noise SD = SD of (output - reference) in eroded interiors of
fat, muscle, liver, kidney, spleen, grey and white matter (phantoms) or flat soft tissue of
the reference (real slices); lesion contrast ratio = (lesion - ring background) of the output
over that of the reference; lesion contrast error = mean |output contrast - reference \
contrast| (HU for CT); CT
restoration also reports the contrast ratio over the lesions whose reference contrast is
>= 10 HU (a ratio to a reference contrast near 0, e.g. a 1 HU brain lesion, is noise: the
residual noise of 1 HU moves it by 100 %); lesion Dice of a threshold segmentation at the \
midpoint of the
reference's lesion and background means (engine/research/metrics.py); CT->MR also splits
lesions >= 5 mm by their contrast in the received CT: CT-visible |dHU| >= 10, CT-occult < 10
(below the grey / white matter contrast; no CT->MR model can draw them): the CT->MR Dice target
is read over the
CT-visible lesions, the CT-occult ones are reported beside it; restoration reads lesion
contrast relative to the received image: a lesion (CT: of >= 10 HU reference contrast, shown
with the reference's sign in the input) is kept when the output keeps >= 90 % of its contrast
in the input ("lesions kept"), reported with the mean output / input contrast ("contrast
ratio to input") and the mean contrast ratio to the reference (aim >= 0.9); false lesions /
slice = in-body blobs of at least a 5 mm disc where the output departs from the reference by
over half the median lesion contrast (CT: of lesions of >= 10 HU), in the lesions' direction,
standing out from
their own surroundings in the output, away from true lesions
(engine.research.metrics.false_lesions).
Pictures: input | output |
reference | output - reference, centre slice; true lesions outlined green on the reference,
false lesions red on the output.
"""


def write_report(sections: Sequence[Section], out_dir: Path | str, title: str,
                 preamble: str = "") -> Path:
    """Write ``report.md`` and ``metrics.json`` (every per-case number) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", "", preamble, "", CONVENTIONS, ""]
    md += [section_markdown(s) for s in sections]
    (out_dir / "report.md").write_text("\n".join(md))
    payload = [{"title": s.title, "task": s.task, "description": s.description,
                "mean": {m: s.mean(m) for m in s.per_case}, "per_case": s.per_case,
                "pictures": s.pictures} for s in sections]
    (out_dir / "metrics.json").write_text(json.dumps(payload, indent=1, default=_json_num))
    return out_dir / "report.md"


def _json_num(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x).__name__)


# --------------------------------------------------------------------------- augmentation


def _smooth(a: np.ndarray, sigma: float) -> np.ndarray:
    return np.stack([ndimage.gaussian_filter(np.asarray(x, np.float64), sigma) for x in a])


def _texture_sd(img: np.ndarray, flat: np.ndarray) -> float:
    """SD of the high-pass (image minus its ``TEXTURE_SIGMA`` Gaussian) in flat tissue."""
    hp = np.asarray(img, np.float64) - _smooth(img, TEXTURE_SIGMA)
    return float(hp[flat].std()) if flat.any() else math.nan


def score_variants(case: Case, variants: Sequence[Volume]) -> dict[str, float]:
    """Augmentation metrics of ``variants`` of ``case.input`` (CT, HU).

    Per variant (then averaged): MAE (body) and SSIM (soft-tissue window; whole image and, with
    labels, inside ``AUG_ROIS``: brain and liver, whose anatomy is low-contrast) to the input; body
    (HU > ``BODY_HU``) and bone (smoothed HU > ``BONE_HU``) Dice with the input; texture ratio
    = SD of the high-pass in flat tissue, variant over input (1: the scan's noise and texture
    kept; < 1 smoothed; > 1 noisier); with a lesion mask, lesion contrast ratio and Dice
    against the reference (as for restoration) and false lesions per slice. Across variants:
    the per-pixel SD in the body, raw and after a ``STRUCT_SIGMA`` px Gaussian (variation
    beyond pixel noise); NaN for a single variant.
    """
    if not variants:
        raise ValueError("no variants")
    inp = np.asarray(case.input.data, np.float64)
    ref = np.asarray(case.reference.data, np.float64)
    body = case.labels != AIR if case.labels is not None else inp > BODY_HU
    flat = (M.flat_mask_from_labels(case.labels, FLAT_TISSUES) if case.labels is not None
            else M.flat_mask_from_reference(ref))
    bone_in = _smooth(inp, 0.75) > BONE_HU
    tex_in = _texture_sd(inp, flat)
    excl = case.labels == VESSEL if case.labels is not None else None
    has_les = case.lesion_mask is not None and bool((case.lesion_mask > 0).any())
    rows: list[dict[str, float]] = []
    for v in variants:
        o = np.asarray(v.data, np.float64)
        if o.shape != inp.shape:
            raise ValueError(f"variant shape {o.shape} != input shape {inp.shape}")
        smap = M.ssim_map(inp, o, M.CT_WINDOW)
        r = {"mae_to_input": M.mae(inp, o, body), "ssim_to_input": float(smap.mean()),
             "body_dice": M.dice(inp > BODY_HU, o > BODY_HU),
             "bone_dice": M.dice(bone_in, _smooth(o, 0.75) > BONE_HU),
             "texture_ratio": _texture_sd(o, flat) / tex_in if tex_in else math.nan}
        if (
            case.labels is not None
        ):  # low-contrast anatomy: ventricles and grey / white matter, liver
            for name, tissues in AUG_ROIS.items():
                roi = np.isin(case.labels, tissues)
                r[f"ssim_to_input_{name}"] = float(smap[roi].mean()) if roi.any() else math.nan
        if has_les:
            assert case.lesion_mask is not None
            scores = M.lesion_scores(ref, o, case.lesion_mask, case.reference.spacing, exclude=excl)
            for k, val in M.summarize_lesions(scores).items():
                r[f"lesion_{k}"] = val
            r["false_lesions_per_slice"] = M.false_lesions(
                ref,
                o,
                case.lesion_mask,
                case.reference.spacing,
                body,
                excl,
                min_contrast=_min_contrast(case),
            )
        rows.append(r)
    res = {k: float(np.nanmean([r[k] for r in rows])) if any(not math.isnan(r[k]) for r in rows)
           else math.nan for k in rows[0]}
    if len(variants) > 1:
        stack = np.stack([np.asarray(v.data, np.float64) for v in variants])
        res["variant_sd"] = float(stack.std(axis=0)[body].mean())
        sm = np.stack([_smooth(x, STRUCT_SIGMA) for x in stack])
        res["structural_sd"] = float(sm.std(axis=0)[body].mean())
    else:
        res["variant_sd"] = res["structural_sd"] = math.nan
    return res


def variants_picture(
    case: Case, outputs: dict[str, list[Volume]], path: Path, tile: int = 256
) -> Path:
    """Grid PNG of the centre slice, one row per method: input | variant 1 | variant 2 |
    variant 1 - input | SD across variants (soft-tissue window; the difference is mid-grey at
    0 and saturates at +/- 100 HU, the SD is black at 0 and white at 100 HU)."""
    k = case.input.data.shape[0] // 2
    head = 18
    cols = ("input", "variant 1", "variant 2", "variant 1 - input", "SD across variants")
    canvas = Image.new("L", (tile * len(cols), head + len(outputs) * (tile + head)), 0)
    draw = ImageDraw.Draw(canvas)
    font = _font(13)
    for j, c in enumerate(cols):
        draw.text((j * tile + 4, 2), c, fill=255, font=font)
    lo, hi = M.CT_WINDOW
    inp = case.input.data[k]
    blank = np.zeros_like(inp, dtype=np.uint8)
    for r, (name, vs) in enumerate(outputs.items()):
        y0 = head + r * (tile + head)
        draw.text((4, y0 + 2), name, fill=255, font=font)
        sl = [v.data[k] for v in vs]
        tiles = [
            _to_u8(inp, lo, hi),
            _to_u8(sl[0], lo, hi),
            _to_u8(sl[1], lo, hi) if len(sl) > 1 else blank,
            _to_u8(sl[0] - inp, -100.0, 100.0),
            _to_u8(np.std(np.stack(sl), axis=0), 0.0, 100.0) if len(sl) > 1 else blank,
        ]
        for j, t in enumerate(tiles):
            canvas.paste(
                Image.fromarray(t).resize((tile, tile), Image.Resampling.LANCZOS),
                (j * tile, y0 + head),
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    return path


def run_augment_section(title: str, cases: Sequence[Case], methods: dict[str, VariantsMethod],
                        out_dir: Path | str, description: str = "", n_pictures: int = 2) -> Section:
    """Score every augmentation method's variants on every case (:func:`score_variants`),
    with the received input itself as the first row ("no augmentation"); pictures of the
    first ``n_pictures`` cases."""
    out_dir = Path(out_dir)
    all_methods: dict[str, VariantsMethod] = {"input (no augmentation)": lambda v: [v], **methods}
    per_case: dict[str, list[dict[str, float]]] = {}
    pics = []
    slug = "".join(ch if ch.isalnum() else "_" for ch in title.lower()).strip("_")
    for ci, case in enumerate(cases):
        outputs: dict[str, list[Volume]] = {}
        for name, fn in all_methods.items():
            t0 = time.perf_counter()
            vs = fn(case.input)
            dt = time.perf_counter() - t0
            row = score_variants(case, vs)
            row["sec_per_slice"] = dt / (case.input.data.shape[0] * len(vs))
            per_case.setdefault(name, []).append(row)
            outputs[name] = vs
            log.info(
                "%s %s %s: %s",
                title,
                case.name,
                name,
                {k: round(v, 3) for k, v in row.items() if k in ("mae_to_input", "structural_sd")},
            )
        if ci < n_pictures:
            pics.append(
                variants_picture(
                    case,
                    {k: v for k, v in outputs.items() if not k.startswith("input")} or outputs,
                    out_dir / f"{slug}_{ci}.png",
                ).name
            )
    return Section(title, TaskName.AUGMENT, description, per_case, pics)


def dose_resimulation(n: int, dose: float = 0.5, seed: int = 0) -> VariantsMethod:
    """Classical CT augmentation baseline: ``n`` re-simulations of the received scan at
    ``dose`` of its dose (projection-domain Poisson noise,
    :func:`engine.research.degrade.low_dose_ct`,
    adding noise of dose ``dose / (1 - dose)`` to the scan's own, as for the real slices)."""
    from engine.research.degrade import low_dose_ct

    if not 0 < dose < 1:
        raise ValueError("dose must be in (0, 1)")
    added = dose / (1.0 - dose)

    def run(v: Volume) -> list[Volume]:
        return [
            Volume(
                np.asarray(
                    low_dose_ct(v.data, v.spacing[1], added, seed=seed * 1000 + i), np.float32
                ),
                v.spacing,
                v.intensity,
            )
            for i in range(n)
        ]

    return run


AUGMENT_CONVENTIONS = """\
Augmentation: each method makes N variants of the received normal-dose CT. MAE (body) and SSIM
(-160..240 HU window; also inside the brain, CSF + grey + white matter, and the liver, where the
anatomy is low-contrast) to the input: how far variants move; SD across variants (body, mean of the
per-pixel SD), also after a 2 px Gaussian (variation beyond pixel noise: a noise-only method
scores near 0 there); body (HU > -500) and bone (smoothed HU > 300) Dice with the input: anatomy
kept; texture ratio = SD of the 1.5 px high-pass in flat tissue, variant over input (1 = the
scan's texture kept); lesion metrics against the noise-free phantom (as for restoration) and
false lesions / slice: lesions kept and none added. Pictures: input | variant 1 | variant 2 |
variant 1 - input (+/- 100 HU) | SD across variants (0..100 HU), centre slice.
"""


# --------------------------------------------------------------------------- models


def model_method(model_dir: Path | str, task: str, params: dict[str, Any] | None = None,
                 seed: int = 0, options: Any = None) -> tuple[Method, dict[str, Any]]:
    """A ``Volume -> Volume`` method from a model (or adapter) folder, through
    :func:`engine.api.run_task`.

    Returns the method and a description (model id, version, objective, SHA-256).
    """
    from engine.adapters import load_model_or_adapter_dir
    from engine.api import run_task

    model = load_model_or_adapter_dir(model_dir)

    def run(volume: Volume) -> Volume:
        return run_task(task, volume, model=model, params=params, seed=seed,
                        options=options).outputs[0]

    desc = {"model_id": model.model_id, "version": model.version,
            "objective": model.objective, "weights_sha256": model.weights_sha256}
    return run, desc


def model_variants(model_dir: Path | str, params: dict[str, Any] | None = None, seed: int = 0,
                   options: Any = None) -> tuple[VariantsMethod, dict[str, Any]]:
    """A ``Volume -> [variants]`` method from an augmentation model folder (task ``augment``)."""
    from engine.api import run_task
    from engine.models import load_model_dir

    model = load_model_dir(model_dir)

    def run(volume: Volume) -> list[Volume]:
        return list(run_task(TaskName.AUGMENT, volume, model=model, params=params, seed=seed,
                             options=options).outputs)

    desc = {"model_id": model.model_id, "version": model.version,
            "objective": model.objective, "weights_sha256": model.weights_sha256}
    return run, desc


def section_dicts(sections: Sequence[Section]) -> list[dict[str, Any]]:
    return [asdict(s) for s in sections]
