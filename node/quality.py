"""Quality gate before release: an engine output that fails is held back with its reasons.

Checks (all on physical values, i.e. after the Modality LUT):

* finite: no NaN / infinity anywhere;
* not constant: the volume and every slice vary (standard deviation above ``min_std``);
* range: CT (HU) outputs within ``[hu_min, hu_max]`` (air -1000 HU to dense bone/metal);
* residual statistics against the input, when input and output share the intensity meaning
  (restoration): mean residual (bias) and mean absolute residual below limits, and the
  input/output correlation above ``min_correlation`` (the output still depicts the input);
* for cross-modality outputs (CT -> MR) the foreground (non-background) masks must overlap
  (Dice >= ``min_foreground_dice``), so anatomy did not move or vanish.

The report's numbers are decimal strings (ledger events carry no floats).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from engine.api import Intensity, Volume

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityLimits:
    hu_min: float = -1100.0
    hu_max: float = 4000.0
    min_std: float = 1e-6
    max_abs_bias_hu: float = 30.0  # |mean(out - in)| for CT restoration
    max_mean_abs_residual_hu: float = 150.0
    max_rel_bias: float = 0.1  # non-HU restoration: relative to the input's std
    max_rel_mean_abs_residual: float = 1.0
    min_correlation: float = 0.8
    min_foreground_dice: float = 0.7


@dataclass(frozen=True)
class QualityReport:
    passed: bool
    reasons: tuple[str, ...]
    stats: dict[str, str] = field(default_factory=dict)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _foreground(x: np.ndarray) -> np.ndarray:
    """Voxels above 15 % of the 2nd-98th percentile span: separates body from air /
    background for CT and MR alike."""
    lo, hi = np.percentile(x, [2.0, 98.0])
    return x > lo + 0.15 * (hi - lo)


def check(output: Volume, source: Volume | None = None, limits: QualityLimits | None = None) -> QualityReport:
    """Run the gate on one output volume (optionally against its source volume)."""
    limits = limits or QualityLimits()
    data = np.asarray(output.data, dtype=np.float64)
    reasons: list[str] = []
    stats: dict[str, str] = {}
    finite = np.isfinite(data)
    if not finite.all():
        n = int((~finite).sum())
        return QualityReport(False, (f"{n} non-finite voxel(s) (NaN/inf)",), {"non_finite": str(n)})
    std = float(data.std())
    stats.update(min=_fmt(float(data.min())), max=_fmt(float(data.max())), std=_fmt(std),
                 mean=_fmt(float(data.mean())))
    if std <= limits.min_std:
        reasons.append("output is constant")
    flat = [k for k in range(data.shape[0]) if float(data[k].std()) <= limits.min_std]
    if flat and std > limits.min_std:
        reasons.append(f"{len(flat)} constant slice(s), first index {flat[0]}")
    if output.intensity is Intensity.HU:
        lo, hi = float(data.min()), float(data.max())
        if lo < limits.hu_min or hi > limits.hu_max:
            reasons.append(
                f"HU range [{lo:.0f}, {hi:.0f}] outside [{limits.hu_min:.0f}, {limits.hu_max:.0f}]"
            )
    if source is not None:
        src = np.asarray(source.data, dtype=np.float64)
        if src.shape != data.shape:
            reasons.append(f"shape {data.shape} differs from input {src.shape}")
        elif Intensity(source.intensity) is Intensity(output.intensity):
            resid = data - src
            bias = float(resid.mean())
            mar = float(np.abs(resid).mean())
            sstd = float(src.std())
            corr = float(np.corrcoef(src.ravel(), data.ravel())[0, 1]) if sstd > 0 and std > 0 else 0.0
            stats.update(residual_mean=_fmt(bias), residual_mean_abs=_fmt(mar),
                         residual_std=_fmt(float(resid.std())), correlation=_fmt(corr))
            if output.intensity is Intensity.HU:
                if abs(bias) > limits.max_abs_bias_hu:
                    reasons.append(f"mean residual {bias:.1f} HU exceeds {limits.max_abs_bias_hu:.0f}")
                if mar > limits.max_mean_abs_residual_hu:
                    reasons.append(
                        f"mean |residual| {mar:.1f} HU exceeds {limits.max_mean_abs_residual_hu:.0f}"
                    )
            elif sstd > 0:
                if abs(bias) / sstd > limits.max_rel_bias:
                    reasons.append(f"mean residual {bias / sstd:.2f} input SD exceeds {limits.max_rel_bias}")
                if mar / sstd > limits.max_rel_mean_abs_residual:
                    reasons.append(
                        f"mean |residual| {mar / sstd:.2f} input SD exceeds {limits.max_rel_mean_abs_residual}"
                    )
            if corr < limits.min_correlation:
                reasons.append(f"correlation with input {corr:.3f} below {limits.min_correlation}")
        else:
            a, b = _foreground(src), _foreground(data)
            denom = int(a.sum()) + int(b.sum())
            dice = 2.0 * int((a & b).sum()) / denom if denom else 0.0
            stats["foreground_dice"] = _fmt(dice)
            if dice < limits.min_foreground_dice:
                reasons.append(f"foreground Dice with input {dice:.3f} below {limits.min_foreground_dice}")
    if reasons:
        logger.warning("quality gate held an output: %s", "; ".join(reasons))
    return QualityReport(not reasons, tuple(reasons), stats)
