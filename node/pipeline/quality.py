"""Quality gate before release: an engine output that fails is held back with its reasons.

Checks (all on physical values, i.e. after the Modality LUT), each named in
:attr:`QualityReport.checks` when it fails:

* ``non_finite``: no NaN / infinity anywhere (the reason names the slices);
* ``constant`` / ``slice_constant``: the volume and every slice vary (standard deviation
  above ``min_std``);
* range per intensity meaning: ``hu_range``: CT (HU) outputs within ``[hu_min, hu_max]``
  (air -1000 HU to dense bone / metal); ``mr_range``: MR outputs are magnitude images,
  non-negative; the lowest value may undershoot 0 by at most ``mr_negative_tolerance`` x the
  output's 99th percentile (regressors overshoot around air; 0 = require non-negative);
* restoration (input and output share the intensity meaning), over the volume: ``bias`` (mean
  residual; for MR the change of the foreground's RMS level against the input's with its
  Rician noise power ``2 sigma^2`` taken out, sigma from the background, see :func:`_mr_bias`:
  removing the noise floor is what an MR denoiser should do), ``mean_abs_residual`` and
  ``correlation`` (the output still depicts the input); per slice, so a slice-local failure is
  not averaged away by the others: ``slice_bias`` (mean residual of the slice, HU or in input
  SDs), ``slice_correlation`` and ``slice_edge_ratio`` (contrast kept, see
  :func:`_edge_ratio`: mean gradient magnitude, Gaussian sigma ``EDGE_SIGMA_PX`` px, of the
  output over that of the input's structure, i.e. with the input's noise share taken out,
  inside the input's body mask eroded by ``BODY_EROSION_PX`` px. Below
  ``min_slice_edge_ratio``: edges lost (blurred, flattened soft tissue); above
  ``max_slice_edge_ratio``: structure the input does not have. A slice whose input has less
  edge energy than noise energy is not judged);
* cross-modality (CT -> MR): the foreground (non-background) masks overlap over the volume
  (``foreground_dice`` >= ``min_foreground_dice``) and in every slice with foreground
  (``slice_foreground_dice`` >= ``min_slice_foreground_dice``), so anatomy did not move or
  vanish, also in one slice.

The report's numbers are decimal strings (ledger events carry no floats).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from scipy import ndimage

from engine.api import Intensity, Volume
from engine.conditioning import AIR_HU, body_mask, field_of_view

logger = logging.getLogger(__name__)

#: Gaussian sigma (pixels) of the gradient magnitude behind ``slice_edge_ratio``
EDGE_SIGMA_PX = 2.0
#: erosion (pixels) of the input's body mask for ``slice_edge_ratio``: the body outline (air
#: against skin, ~1000 HU) is not the contrast being judged, and an output that blurs it by
#: a few pixels must not bring its gradient into the judged area (measured with the plain
#: output/input gradient ratio: 3 px let a sigma 8 px blur of the 512 px e2e abdomen keep
#: 0.75, 9 px gave 0.60)
BODY_EROSION_PX = 9
#: MR bias: fewest background voxels to estimate the Rician sigma from (else no correction)
MIN_BACKGROUND_VOXELS = 500
MR_INTENSITIES = (Intensity.MR, Intensity.MR_T1W, Intensity.MR_T2W)
#: dilation (pixels) of the input's body outline before "outside the body" is judged as
#: background (a synthesised skin edge may be a few pixels wider than the CT's)
BACKGROUND_MARGIN_PX = 5
#: CT input values below this (outside the body) are the air the background checks look at
AIR_BELOW_HU = -900.0


@dataclass(frozen=True)
class QualityLimits:
    """Limits of :func:`check` (config: ``[pipeline.quality]``, same names).

    Raises ValueError naming the limit when a value is out of its range."""

    hu_min: float = -1100.0
    hu_max: float = 4000.0
    mr_negative_tolerance: float = 0.1  # MR: min >= -tolerance * 99th percentile
    min_std: float = 1e-6
    max_abs_bias_hu: float = 30.0  # |mean(out - in)| for CT restoration
    max_mean_abs_residual_hu: float = 150.0
    max_rel_bias: float = 0.1  # non-HU restoration: relative to the input's std
    max_rel_mean_abs_residual: float = 1.0
    min_correlation: float = 0.8
    min_foreground_dice: float = 0.7
    # per slice
    max_slice_abs_bias_hu: float = 50.0
    max_slice_rel_bias: float = 0.25  # non-HU: relative to the input volume's std
    min_slice_correlation: float = 0.7
    min_slice_edge_ratio: float = 0.85
    max_slice_edge_ratio: float = 1.5
    min_slice_foreground_dice: float = 0.5
    # relative to the received input
    hu_range_margin: float = 200.0  # CT: output within the input's own FOV range +- this
    max_air_shift_hu: float = 50.0  # CT restoration: mean change of the air around the body
    max_background_fraction: float = 0.1  # MR outputs: background vs body level

    def __post_init__(self) -> None:
        positive = ("min_std", "max_abs_bias_hu", "max_mean_abs_residual_hu", "max_rel_bias",
                    "max_rel_mean_abs_residual", "max_slice_abs_bias_hu", "max_slice_rel_bias",
                    "min_slice_edge_ratio", "max_slice_edge_ratio", "max_air_shift_hu",
                    "max_background_fraction")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("min_correlation", "min_slice_correlation"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [-1, 1], got {getattr(self, name)!r}")
        for name in ("min_foreground_dice", "min_slice_foreground_dice", "mr_negative_tolerance"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.hu_range_margin < 0:
            raise ValueError(f"hu_range_margin must be >= 0, got {self.hu_range_margin!r}")
        if not self.hu_min < self.hu_max:
            raise ValueError(f"hu_min ({self.hu_min}) must be below hu_max ({self.hu_max})")
        if not self.min_slice_edge_ratio < self.max_slice_edge_ratio:
            raise ValueError(f"min_slice_edge_ratio ({self.min_slice_edge_ratio}) must be below "
                             f"max_slice_edge_ratio ({self.max_slice_edge_ratio})")

    @classmethod
    def from_settings(cls, settings: Any) -> QualityLimits:
        """The limits named in ``settings`` (a ``QualitySettings``); the rest default."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: float(v) for k, v in settings.model_dump().items() if k in names})

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class QualityReport:
    passed: bool
    reasons: tuple[str, ...]
    stats: dict[str, str] = field(default_factory=dict)
    checks: tuple[str, ...] = ()  # names of the failed checks (module docstring)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _foreground(x: np.ndarray) -> np.ndarray:
    """Voxels above 15 % of the 2nd-98th percentile span: separates body from air /
    background for CT and MR alike."""
    lo, hi = np.percentile(x, [2.0, 98.0])
    return x > lo + 0.15 * (hi - lo)


def _slices(idx: list[int]) -> str:
    shown = ", ".join(str(k) for k in idx[:8])
    return f"{len(idx)} slice(s) ({shown}{', ...' if len(idx) > 8 else ''})"


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays (0 when either is constant)."""
    return float(_slice_corrs(a.reshape(1, -1), b.reshape(1, -1))[0])


def _slice_corrs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation per leading index (slice) of two (z, ...) arrays, vectorised;
    0 for a slice where either is constant."""
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    num = np.einsum("ij,ij->i", a, b)
    den = np.sqrt(np.einsum("ij,ij->i", a, a) * np.einsum("ij,ij->i", b, b))
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _unit_noise_gradient_energy(sigma: float) -> float:
    """E|grad(G_sigma * n)|^2 for unit white noise n, as ``gaussian_gradient_magnitude``
    computes the gradient (separable kernels: 2 * sum(g0^2) * sum(g1^2))."""
    impulse = np.zeros(int(8 * sigma) * 2 + 1)
    impulse[impulse.size // 2] = 1.0
    g0 = ndimage.gaussian_filter1d(impulse, sigma, order=0)
    g1 = ndimage.gaussian_filter1d(impulse, sigma, order=1)
    return float(2.0 * (g0 ** 2).sum() * (g1 ** 2).sum())


_NOISE_GRAD_ENERGY = _unit_noise_gradient_energy(EDGE_SIGMA_PX)
_KERNEL_REACH_PX = 4.0 * EDGE_SIGMA_PX + 0.5  # scipy's gaussian kernel radius (truncate 4)


def _edge_ratio(src: np.ndarray, out: np.ndarray, body: np.ndarray) -> float | None:
    """Edge strength kept inside ``body``: mean smoothed gradient magnitude of the output over
    that of the input's structure. The input's gradient is noisy; its structure magnitude per
    pixel is sqrt(max(|grad in|^2 - E_noise, 0)) (noise and structure energies add; E_noise
    from the input's noise SD, estimated from the median absolute difference of horizontal
    neighbours, white noise assumed). A denoiser that removes only noise keeps the ratio
    near 1. None: no body pixels, or the input's mean structure energy is below its noise
    energy (an input without edges there has no contrast to keep)."""
    pairs = body[:, 1:] & body[:, :-1]
    if not pairs.any():
        return None
    # the gradients only matter inside body: compute them on its bounding box plus the
    # kernel's reach (identical values there, a fraction of the work)
    rows, cols = np.nonzero(body)
    m = int(_KERNEL_REACH_PX) + 1
    box = (slice(max(rows.min() - m, 0), rows.max() + m + 1),
           slice(max(cols.min() - m, 0), cols.max() + m + 1))
    src, out, body = src[box], out[box], body[box]
    pairs = body[:, 1:] & body[:, :-1]
    g_in2 = (ndimage.gaussian_gradient_magnitude(src, EDGE_SIGMA_PX) ** 2)[body]
    noise_sd = 1.4826 * float(np.median(np.abs(np.diff(src, axis=1)[pairs]))) / np.sqrt(2.0)
    e_noise = _NOISE_GRAD_ENERGY * noise_sd ** 2
    if float(g_in2.mean()) - e_noise < e_noise:
        return None
    structure = float(np.sqrt(np.maximum(g_in2 - e_noise, 0.0)).mean())
    if structure <= 0:
        return None
    return float(ndimage.gaussian_gradient_magnitude(out, EDGE_SIGMA_PX)[body].mean() / structure)


class _Gate:
    """Collects reasons, failed check names and statistics of one run of :func:`check`."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.checks: list[str] = []
        self.stats: dict[str, str] = {}

    def fail(self, name: str, reason: str) -> None:
        if name not in self.checks:
            self.checks.append(name)
        self.reasons.append(reason)


def _rician_sigma(src: np.ndarray, fg: np.ndarray) -> float:
    """Noise sigma of a magnitude MR input from its signal-free background (Rayleigh mean
    sigma sqrt(pi / 2)): voxels more than 3 px (in plane) from the foreground; 0 when fewer
    than ``MIN_BACKGROUND_VOXELS`` remain (a tightly cropped image: no correction)."""
    bg = ~np.stack([ndimage.binary_dilation(m, iterations=3) for m in fg])
    if int(bg.sum()) < MIN_BACKGROUND_VOXELS:
        return 0.0
    return float(src[bg].mean() / np.sqrt(np.pi / 2.0))


def _mr_bias(src: np.ndarray, out: np.ndarray, sigma: float) -> float:
    """Mean-level change of an MR restoration in the foreground, against the received image
    with its Rician noise power taken out: a magnitude image M of true signal A and noise
    sigma has E[M^2] = A^2 + 2 sigma^2 (Gudbjartsson & Patz, MRM 34:910, 1995), so the received
    image overstates the signal, by about 0.1 input SD at SNR 8 and 0.3 at SNR 5; a denoiser
    that removes that floor is right, not biased. Returned: RMS(out) - sqrt(max(mean(M^2) -
    2 sigma^2, 0)) over the given voxels, a level change in the image's units (a shift by c of a
    uniform region changes it by exactly c)."""
    expected = float(
        np.sqrt(max(float(np.mean(np.square(src, dtype=np.float64))) - 2.0 * sigma * sigma, 0.0))
    )
    return float(np.sqrt(np.mean(np.square(out, dtype=np.float64)))) - expected


def _restoration(
    g: _Gate, src: np.ndarray, data: np.ndarray, hu: bool, limits: QualityLimits
) -> None:
    """Residual statistics over the volume and per slice; per-slice edge ratio."""
    body_all = _foreground(src)
    sigma = 0.0 if hu else _rician_sigma(src, body_all)
    sstd = float(src.std())
    _volume_residual(g, src, data, hu, limits, body_all, sigma, sstd)
    _slice_residual(g, src, data, hu, limits, body_all, sigma, sstd)
    _slice_edges(g, src, data, limits, body_all)


def _volume_residual(g: _Gate, src: np.ndarray, data: np.ndarray, hu: bool,
                     limits: QualityLimits, body_all: np.ndarray, sigma: float,
                     sstd: float) -> None:
    """Bias, mean |residual| and correlation over the whole volume."""
    resid = data - src
    if hu or not body_all.any():
        bias = float(resid.mean())
    else:
        bias = _mr_bias(src[body_all], data[body_all], sigma)
    mar = float(np.abs(resid).mean())
    corr = _corr(src, data)
    g.stats.update(residual_mean=_fmt(bias), residual_mean_abs=_fmt(mar),
                   residual_std=_fmt(float(resid.std())), correlation=_fmt(corr))
    if hu:
        if abs(bias) > limits.max_abs_bias_hu:
            g.fail("bias", f"mean residual {bias:.1f} HU exceeds {limits.max_abs_bias_hu:.0f}")
        if mar > limits.max_mean_abs_residual_hu:
            g.fail("mean_abs_residual",
                   f"mean |residual| {mar:.1f} HU exceeds {limits.max_mean_abs_residual_hu:.0f}")
    elif sstd > 0:
        if abs(bias) / sstd > limits.max_rel_bias:
            g.fail(
                "bias", f"mean residual {bias / sstd:.2f} input SD exceeds {limits.max_rel_bias}"
            )
        if mar / sstd > limits.max_rel_mean_abs_residual:
            g.fail(
                "mean_abs_residual",
                f"mean |residual| {mar / sstd:.2f} input SD exceeds "
                f"{limits.max_rel_mean_abs_residual}",
            )
    if corr < limits.min_correlation:
        g.fail("correlation", f"correlation with input {corr:.3f} below {limits.min_correlation}")


def _slice_residual(g: _Gate, src: np.ndarray, data: np.ndarray, hu: bool,
                    limits: QualityLimits, body_all: np.ndarray, sigma: float,
                    sstd: float) -> None:
    """Per slice: bias (MR: in the slice's foreground; a slice without any: plain mean) and
    correlation with the input."""
    resid = data - src
    if hu:
        biases = resid.reshape(resid.shape[0], -1).mean(axis=1)
    else:
        biases = np.array([_mr_bias(a[m], b[m], sigma) if m.any() else float((b - a).mean())
                           for a, b, m in zip(src, data, body_all, strict=True)])
    scale, unit, limit = ((1.0, "HU", limits.max_slice_abs_bias_hu) if hu
                          else (sstd or 1.0, "input SD", limits.max_slice_rel_bias))
    rel = np.abs(biases) / scale
    worst = int(np.argmax(rel))
    g.stats.update(
        slice_residual_mean_max_abs=_fmt(float(rel[worst])), slice_residual_mean_worst=str(worst)
    )
    bad = [k for k in range(len(rel)) if rel[k] > limit]
    if bad:
        g.fail("slice_bias", f"mean residual above {limit:g} {unit} in {_slices(bad)}; worst slice "
                             f"{worst}: {biases[worst] / scale:.2f} {unit}")
    corrs = [float(c) for c in _slice_corrs(src, data)]
    k = int(np.argmin(corrs))
    g.stats.update(slice_correlation_min=_fmt(corrs[k]), slice_correlation_worst=str(k))
    bad = [i for i, c in enumerate(corrs) if c < limits.min_slice_correlation]
    if bad:
        g.fail(
            "slice_correlation",
            f"correlation with input below {limits.min_slice_correlation} in "
            f"{_slices(bad)}; worst slice {k}: {corrs[k]:.3f}",
        )


def _slice_edges(g: _Gate, src: np.ndarray, data: np.ndarray, limits: QualityLimits,
                 body_all: np.ndarray) -> None:
    """Per slice: output / input edge energy inside the eroded body outline."""
    ratios: dict[int, float] = {}
    for i in range(src.shape[0]):
        body = ndimage.binary_erosion(body_all[i], iterations=BODY_EROSION_PX)
        r = _edge_ratio(src[i], data[i], body)
        if r is not None:
            ratios[i] = r
    if not ratios:
        g.stats["slice_edge_ratio_judged"] = f"0/{src.shape[0]}"
        return
    lo_k, hi_k = min(ratios, key=ratios.__getitem__), max(ratios, key=ratios.__getitem__)
    g.stats.update(
        slice_edge_ratio_min=_fmt(ratios[lo_k]), slice_edge_ratio_max=_fmt(ratios[hi_k])
    )
    g.stats["slice_edge_ratio_judged"] = f"{len(ratios)}/{src.shape[0]}"
    low = [i for i, r in ratios.items() if r < limits.min_slice_edge_ratio]
    high = [i for i, r in ratios.items() if r > limits.max_slice_edge_ratio]
    if low:
        g.fail(
            "slice_edge_ratio",
            f"edges (contrast) lost: output/input edge ratio below "
            f"{limits.min_slice_edge_ratio} in {_slices(low)}; worst slice "
            f"{lo_k}: {ratios[lo_k]:.3f}",
        )
    if high:
        g.fail(
            "slice_edge_ratio",
            f"edges the input lacks: output/input edge ratio above "
            f"{limits.max_slice_edge_ratio} in {_slices(high)}; worst slice "
            f"{hi_k}: {ratios[hi_k]:.3f}",
        )


def _cross_modality(g: _Gate, src: np.ndarray, data: np.ndarray, limits: QualityLimits) -> None:
    a, b = _foreground(src), _foreground(data)
    denom = int(a.sum()) + int(b.sum())
    dice = 2.0 * int((a & b).sum()) / denom if denom else 0.0
    g.stats["foreground_dice"] = _fmt(dice)
    if dice < limits.min_foreground_dice:
        g.fail(
            "foreground_dice",
            f"foreground Dice with input {dice:.3f} below {limits.min_foreground_dice}",
        )
    dices: dict[int, float] = {}
    for k in range(src.shape[0]):
        n = int(a[k].sum()) + int(b[k].sum())
        if n:  # a slice with no foreground in either has nothing to overlap
            dices[k] = 2.0 * int((a[k] & b[k]).sum()) / n
    if dices:
        k = min(dices, key=dices.__getitem__)
        g.stats.update(slice_foreground_dice_min=_fmt(dices[k]), slice_foreground_dice_worst=str(k))
        bad = [i for i, d in dices.items() if d < limits.min_slice_foreground_dice]
        if bad:
            g.fail(
                "slice_foreground_dice",
                f"foreground Dice with input below "
                f"{limits.min_slice_foreground_dice} in {_slices(bad)}; "
                f"worst slice {k}: {dices[k]:.3f}",
            )


def _outside_body(src: Volume, fov: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Inside the FOV, more than ``BACKGROUND_MARGIN_PX`` from the body outline; for CT also
    air (below ``AIR_BELOW_HU``: not a head holder or table)."""
    near = np.stack([ndimage.binary_dilation(b, iterations=BACKGROUND_MARGIN_PX) for b in body])
    out = fov & ~near
    if src.intensity is Intensity.HU:
        out &= np.asarray(src.data) < AIR_BELOW_HU
    return out


def _background(g: _Gate, source: Volume, src: np.ndarray, data: np.ndarray,
                fov: np.ndarray, out_intensity: Intensity, limits: QualityLimits) -> None:
    """Background stays background: CT restoration keeps the mean of the air around the body
    (``air_shift``); an MR output (synthesised or restored) is dark outside the body
    (``background``) relative to its body level (and, for restoration, to the input's own
    background)."""
    if source.intensity is Intensity.HU:
        body = body_mask(src, fov, source.spacing)
    else:
        body = np.stack([ndimage.binary_fill_holes(m) for m in _foreground(src) & fov])
    outside = _outside_body(source, fov, body)
    if int(outside.sum()) < MIN_BACKGROUND_VOXELS or not body.any():
        g.stats["background_judged"] = "no"
        return
    bg_out, bg_in = float(data[outside].mean()), float(src[outside].mean())
    g.stats.update(background_output_mean=_fmt(bg_out), background_input_mean=_fmt(bg_in))
    if out_intensity is Intensity.HU:
        shift = bg_out - bg_in
        if abs(shift) > limits.max_air_shift_hu:
            g.fail("air_shift", f"air around the body moved by {shift:.1f} HU (input "
                                f"{bg_in:.0f}, output {bg_out:.0f}; limit "
                                f"{limits.max_air_shift_hu:g})")
        return
    level = float(np.median(data[body]))
    g.stats["body_output_median"] = _fmt(level)
    allowed = limits.max_background_fraction * max(level, 0.0)
    if source.intensity is not Intensity.HU:  # MR restoration: the input's background too
        allowed += max(bg_in, 0.0)
    if bg_out > allowed:
        g.fail("background", f"background is not dark: mean {bg_out:.4g} outside the body "
                             f"above {allowed:.4g} ({limits.max_background_fraction:g} x body "
                             f"median {level:.4g}"
                             + (f" + input background {bg_in:.4g})"
                                if source.intensity is not Intensity.HU else ")"))


def _field_of_view(g: _Gate, source: Volume, data: np.ndarray,
                   same: bool) -> tuple[np.ndarray, np.ndarray]:
    """The input's field of view and its data with out-of-FOV pixels as air / background;
    for same-intensity outputs the out-of-FOV pixels must be the input's, unchanged
    (``fov_changed``)."""
    src = np.asarray(source.data, dtype=np.float64)
    src = src[None] if src.ndim == 2 else src
    fov = field_of_view(Volume(src.astype(np.float32), source.spacing, source.intensity,
                               fov=source.fov))
    outside = int((~fov).sum())
    g.stats["fov_fraction"] = _fmt(float(fov.mean()))
    if outside and same and data.shape == src.shape:
        changed = int((data[~fov] != src[~fov]).sum())
        if changed:
            g.fail("fov_changed", f"{changed} of {outside} padding / out-of-FOV pixel(s) differ "
                                  "from the input's")
    fill = AIR_HU if source.intensity is Intensity.HU else 0.0
    return fov, np.where(fov, src, fill)


def _hu_range(g: _Gate, data: np.ndarray, fov: np.ndarray | None, src: np.ndarray | None,
              limits: QualityLimits) -> None:
    """CT output inside the FOV within ``[hu_min, hu_max]``, widened to the input's own FOV
    range +- ``hu_range_margin`` (real air noise goes below -1100 HU, metal above 4000)."""
    vals = data[fov] if fov is not None else data
    if vals.size == 0:
        return
    lo_lim, hi_lim = limits.hu_min, limits.hu_max
    if src is not None and fov is not None and fov.any():
        lo_lim = min(lo_lim, float(src[fov].min()) - limits.hu_range_margin)
        hi_lim = max(hi_lim, float(src[fov].max()) + limits.hu_range_margin)
    lo, hi = float(vals.min()), float(vals.max())
    g.stats.update(fov_min=_fmt(lo), fov_max=_fmt(hi), hu_range_allowed=f"[{lo_lim:.0f}, "
                                                                          f"{hi_lim:.0f}]")
    if lo < lo_lim or hi > hi_lim:
        g.fail("hu_range", f"HU range in the field of view [{lo:.0f}, {hi:.0f}] outside "
                           f"[{lo_lim:.0f}, {hi_lim:.0f}] (the input's range +- "
                           f"{limits.hu_range_margin:g}, at least [{limits.hu_min:.0f}, "
                           f"{limits.hu_max:.0f}])")


def check(
    output: Volume, source: Volume | None = None, limits: QualityLimits | None = None
) -> QualityReport:
    """Run the gate on one output volume (optionally against its source volume)."""
    limits = limits or QualityLimits()
    data = np.asarray(output.data, dtype=np.float64)
    data = data[None] if data.ndim == 2 else data
    g = _Gate()
    finite = np.isfinite(data)
    if not finite.all():
        n = int((~finite).sum())
        where = [k for k in range(data.shape[0]) if not finite[k].all()]
        g.fail("non_finite", f"{n} non-finite voxel(s) (NaN/inf) in {_slices(where)}")
        return QualityReport(False, tuple(g.reasons), {"non_finite": str(n),
                                                       "non_finite_slices": str(len(where))},
                             tuple(g.checks))
    std = float(data.std())
    g.stats.update(min=_fmt(float(data.min())), max=_fmt(float(data.max())), std=_fmt(std),
                   mean=_fmt(float(data.mean())))
    if std <= limits.min_std:
        g.fail("constant", "output is constant")
    flat = [k for k in range(data.shape[0]) if float(data[k].std()) <= limits.min_std]
    if flat and std > limits.min_std:
        g.fail("slice_constant", f"{len(flat)} constant slice(s), first index {flat[0]}")
    intensity = Intensity(output.intensity)
    fov: np.ndarray | None = None
    src: np.ndarray | None = None
    if source is not None:
        same = Intensity(source.intensity) is intensity
        fov, src = _field_of_view(g, source, data, same)
        if src.shape != data.shape:
            g.fail("shape", f"shape {data.shape} differs from input {src.shape}")
            return QualityReport(False, tuple(g.reasons), g.stats, tuple(g.checks))
    elif intensity is Intensity.HU:
        fov = field_of_view(Volume(data.astype(np.float32), (1.0, 1.0, 1.0), intensity))
    if intensity is Intensity.HU:
        _hu_range(g, data, fov, src if source is not None and
                  Intensity(source.intensity) is Intensity.HU else None, limits)
    elif intensity in MR_INTENSITIES:
        p99 = float(np.percentile(data, 99.0))
        floor = -limits.mr_negative_tolerance * max(p99, 0.0)
        g.stats["p99"] = _fmt(p99)
        lo = float(data.min())
        if lo < floor:
            g.fail("mr_range", f"MR magnitude below 0: minimum {lo:.4g} under {floor:.4g} "
                               f"(-{limits.mr_negative_tolerance:g} x 99th percentile {p99:.4g})")
    if source is not None and src is not None and fov is not None:
        assert source is not None
        # out-of-FOV pixels are judged above (unchanged); the statistics see them as air
        filled = np.where(fov, data, src) if Intensity(source.intensity) is intensity else data
        if Intensity(source.intensity) is intensity:
            _restoration(g, src, filled, intensity is Intensity.HU, limits)
        else:
            _cross_modality(g, src, filled, limits)
        _background(g, source, src, filled, fov, intensity, limits)
    if g.reasons:
        logger.warning("quality gate held an output: %s", "; ".join(g.reasons))
    return QualityReport(not g.reasons, tuple(g.reasons), g.stats, tuple(g.checks))
