"""Acquisition degradations: low-dose CT (projection-domain Poisson noise) and MR Rician noise.

Low-dose CT
-----------
The image in HU is turned into linear attenuation ``mu = mu_water (1 + HU / 1000)``, forward
projected (``skimage.transform.radon``, parallel beam), and the transmitted counts
``I = I0 * dose * exp(-p)`` are drawn from a Poisson law with additive Gaussian electronic
noise; ``p_noisy = -log(I / (I0 dose))``. Filtered back-projection (``iradon``, ramp filter) is
linear, so the low-dose image is the reference plus ``FBP(p_noisy - p)`` converted back to HU:
the noise-insertion scheme of Yu et al., "Development and validation of a practical lower-dose-
simulation tool for optimizing CT scan protocols", Med Phys 39:5035 (2012), Zeng et al., Med
Phys 42:5447 (2015). The reference keeps its resolution and no FBP discretisation artefacts
enter the pair; only the noise is reconstructed.

Photon budget: ``I0`` is the unattenuated count per detector bin per view at full dose, for a
0.7 mm bin and 1000 views (``FULL_DOSE_I0``), scaled by the actual bin width and view count so
the total dose does not depend on the angle count chosen for speed. With the default, a 512 x 512
abdomen phantom at dose 1.0 shows roughly 10-13 HU noise SD in the liver (measured in
bench/results/engine_eval.md), typical of clinical abdominal CT.

The clean sinogram only sets the noise variance, so it is computed at 256 x 256 for larger
images (``variance_size``) and interpolated along the detector axis; the noise is always
reconstructed at full resolution. Noise is inserted only inside the reconstruction circle.

Sparse-view CT
--------------
:func:`sparse_view_ct`: the slice is forward projected at ``SPARSE_FULL_VIEWS`` (720) parallel
views over 180 degrees; every k-th view is kept (60 or 90 views) and both sinograms are
reconstructed by filtered back-projection (ramp filter). The sparse-view image is the reference
plus the difference ``FBP(sparse) - FBP(720)`` (the streaks), the same insertion scheme as the
low-dose noise above: the reference keeps its resolution and only the sparse-sampling artefact
enters the pair. Parallel beam stands in for the real fan / cone geometry.

MR
--
Rician magnitude noise (Gudbjartsson & Patz, MRM 34:910, 1995) with per-channel
``sigma = mean foreground signal / SNR``. :func:`mr_undersample`: Cartesian undersampling of
k-space along the phase-encoding direction (rows): a fully sampled centre band plus random
lines up to ``1 / acceleration`` of the lines, zero-filled, magnitude of the inverse FFT
(fastMRI's random mask: centre fraction 0.08 at 4x, 0.04 at 8x).

Everything is deterministic given ``seed``.
"""
from __future__ import annotations

import logging
from typing import overload

import numpy as np
from scipy import ndimage
from skimage.transform import iradon, radon

from engine.research.phantoms import rician

log = logging.getLogger(__name__)

MU_WATER_PER_MM = 0.0193  # ~ 70 keV effective energy
FULL_DOSE_I0 = 4.0e6  # effective photons per 0.7 mm bin per view at 1000 views, full dose
REF_BIN_MM = 0.7
REF_VIEWS = 1000
ELECTRONIC_NOISE = 10.0  # SD of additive Gaussian detector noise, in photons
DOSE_LEVELS = (0.5, 0.25, 0.1)


def default_angles(size: int) -> int:
    """View count used for a ``size`` x ``size`` slice: 180 up to 256 px, else 360.

    Chosen by measurement (bench/results/engine_eval.md): skimage's radon/iradon cost grows
    linearly with views, while the liver noise SD changed by < 3 % from 180 to 720 views (the
    photon budget is per total dose, not per view).
    """
    return 180 if size <= 256 else 360


def hu_to_mu(hu: np.ndarray) -> np.ndarray:
    """Linear attenuation (1/mm) from HU; air (-1000) maps to 0."""
    return np.clip(MU_WATER_PER_MM * (1.0 + np.asarray(hu, dtype=np.float64) / 1000.0), 0, None)


def _circle(size: int) -> np.ndarray:
    """The reconstruction circle exactly as ``skimage.transform.radon(circle=True)`` uses it."""
    c = np.arange(size) - size // 2
    return (c[:, None] ** 2 + c[None, :] ** 2) <= (size // 2) ** 2


def _line_integrals(mu: np.ndarray, pixel_mm: float, theta: np.ndarray,
                    variance_size: int) -> np.ndarray:
    """Clean sinogram (detector bins of the full-size grid x views) in units of mu * mm."""
    n = mu.shape[0]
    mu = mu * _circle(n)
    if n > variance_size:
        f = variance_size / n
        small = ndimage.zoom(mu, f, order=1, grid_mode=True, mode="nearest") * _circle(
            variance_size
        )
        p_small = radon(small, theta, circle=True) * (pixel_mm / f)
        x_small = (np.arange(p_small.shape[0]) + 0.5) / p_small.shape[0]
        x_full = (np.arange(n) + 0.5) / n
        return np.stack([np.interp(x_full, x_small, p_small[:, j])
                         for j in range(p_small.shape[1])], axis=1)
    return radon(mu, theta, circle=True) * pixel_mm


def low_dose_noise(hu: np.ndarray, pixel_mm: float, doses: tuple[float, ...], seed: int,
                   n_angles: int | None = None, i0: float = FULL_DOSE_I0,
                   electronic_noise: float = ELECTRONIC_NOISE,
                   variance_size: int = 256) -> dict[float, np.ndarray]:
    """Noise images (HU) to add to one 2-D slice for several dose fractions.

    One forward projection serves every dose. Each dose uses its own generator
    ``default_rng([seed, round(dose * 1e6)])``, so a dose level's noise does not depend on
    which other doses were requested.
    """
    if hu.ndim != 2 or hu.shape[0] != hu.shape[1]:
        raise ValueError(f"expected a square 2-D slice, got {hu.shape}")
    if any(not 0 < d <= 1 for d in doses):
        raise ValueError("dose fractions must be in (0, 1]")
    n = hu.shape[0]
    na = n_angles or default_angles(n)
    theta = np.linspace(0.0, 180.0, na, endpoint=False)
    p = _line_integrals(hu_to_mu(hu), pixel_mm, theta, variance_size)
    i0_bin = i0 * (pixel_mm / REF_BIN_MM) * (REF_VIEWS / na)
    out: dict[float, np.ndarray] = {}
    circle = _circle(n)
    for dose in doses:
        rng = np.random.default_rng([seed, round(float(dose) * 1e6)])
        lam = i0_bin * dose * np.exp(-p)
        counts = rng.poisson(lam).astype(np.float64)
        if electronic_noise > 0:  # one simulated view stands for REF_VIEWS / na readings
            counts += rng.normal(0.0, electronic_noise * np.sqrt(REF_VIEWS / na), counts.shape)
        counts = np.maximum(counts, 1.0)
        dp = -np.log(counts / (i0_bin * dose)) - p
        noise_mu = iradon(dp, theta, circle=True, filter_name="ramp") / pixel_mm
        out[dose] = (noise_mu / MU_WATER_PER_MM * 1000.0 * circle).astype(np.float32)
    return out


@overload
def low_dose_ct(hu: np.ndarray, pixel_mm: float, dose: float, seed: int,
                **kwargs: object) -> np.ndarray: ...


@overload
def low_dose_ct(hu: np.ndarray, pixel_mm: float, dose: tuple[float, ...], seed: int,
                **kwargs: object) -> dict[float, np.ndarray]: ...


def low_dose_ct(hu: np.ndarray, pixel_mm: float, dose: float | tuple[float, ...], seed: int,
                **kwargs: object) -> np.ndarray | dict[float, np.ndarray]:
    """Simulated low-dose version of a CT slice or stack (z, y, x) in HU.

    Parameters
    ----------
    hu
        2-D slice or 3-D stack (z, y, x) in HU, square in-plane.
    pixel_mm
        In-plane pixel spacing.
    dose
        Fraction of full dose (e.g. 0.25) or a tuple of fractions (then a dict is returned).
    seed
        Slice ``k`` of a stack uses seed ``[seed, k]``.
    kwargs
        Passed to :func:`low_dose_noise` (``n_angles``, ``i0``, ``electronic_noise``).
    """
    doses = (dose,) if isinstance(dose, (int, float)) else tuple(dose)
    arr = np.asarray(hu, dtype=np.float32)
    stack = arr[None] if arr.ndim == 2 else arr
    if stack.ndim != 3:
        raise ValueError(f"expected 2-D or 3-D HU array, got shape {arr.shape}")
    res = {d: np.empty_like(stack) for d in doses}
    for k in range(stack.shape[0]):
        noise = low_dose_noise(stack[k], pixel_mm, doses, seed=seed * 100_003 + k,
                               **kwargs)  # type: ignore[arg-type]
        for d in doses:
            res[d][k] = np.clip(stack[k] + noise[d], -1024.0, 3071.0)
    final = {d: (v[0] if arr.ndim == 2 else v) for d, v in res.items()}
    if isinstance(dose, (int, float)):
        return next(iter(final.values()))
    return final


SPARSE_FULL_VIEWS = 720
SPARSE_VIEWS = (60, 90)


def sparse_view_streaks(hu: np.ndarray, views: int, full_views: int = SPARSE_FULL_VIEWS
                        ) -> np.ndarray:
    """Streak image (HU) of one square 2-D slice: ``FBP(views) - FBP(full_views)``, with the
    ``views`` kept evenly spaced among the ``full_views`` (``full_views % views == 0``)."""
    if hu.ndim != 2 or hu.shape[0] != hu.shape[1]:
        raise ValueError(f"expected a square 2-D slice, got {hu.shape}")
    if views < 1 or full_views % views:
        raise ValueError(f"views {views} must divide {full_views}")
    n = hu.shape[0]
    circle = _circle(n)
    theta = np.linspace(0.0, 180.0, full_views, endpoint=False)
    mu = hu_to_mu(hu) * circle
    p = radon(mu, theta, circle=True)
    step = full_views // views
    full = iradon(p, theta, circle=True, filter_name="ramp")
    sparse = iradon(p[:, ::step], theta[::step], circle=True, filter_name="ramp")
    return ((sparse - full) / MU_WATER_PER_MM * 1000.0 * circle).astype(np.float32)


def sparse_view_ct(hu: np.ndarray, views: int, full_views: int = SPARSE_FULL_VIEWS
                   ) -> np.ndarray:
    """Sparse-view CT of a slice or stack (z, y, x) in HU: reference + streaks of FBP from
    ``views`` of ``full_views`` projections (:func:`sparse_view_streaks`), clipped to the
    12-bit HU range. Deterministic (no noise)."""
    arr = np.asarray(hu, dtype=np.float32)
    stack = arr[None] if arr.ndim == 2 else arr
    out = np.stack([np.clip(s + sparse_view_streaks(s, views, full_views), -1024.0, 3071.0)
                    for s in stack]).astype(np.float32)
    return out[0] if arr.ndim == 2 else out


#: fully sampled centre fraction of k-space per acceleration (fastMRI's convention)
CENTER_FRACTION = {4: 0.08, 8: 0.04}


def cartesian_mask(rows: int, acceleration: int, seed: int,
                   center_fraction: float | None = None) -> np.ndarray:
    """Boolean mask of sampled phase-encoding lines (k-space rows, DC at ``rows // 2``): the
    central ``center_fraction`` of lines plus random others, ``rows / acceleration`` lines in
    all (rounded)."""
    if acceleration < 1:
        raise ValueError("acceleration must be >= 1")
    cf = center_fraction if center_fraction is not None else CENTER_FRACTION.get(
        acceleration, 0.32 / acceleration)
    n_center = max(1, round(rows * cf))
    n_total = max(n_center, round(rows / acceleration))
    mask = np.zeros(rows, bool)
    c0 = rows // 2 - n_center // 2
    mask[c0:c0 + n_center] = True
    rest = np.flatnonzero(~mask)
    rng = np.random.default_rng([seed, acceleration, 11])
    mask[rng.choice(rest, size=n_total - n_center, replace=False)] = True
    return mask


def mr_undersample(img: np.ndarray, acceleration: int, seed: int,
                   center_fraction: float | None = None) -> np.ndarray:
    """Zero-filled magnitude reconstruction of a magnitude image (2-D or (z, y, x)) from
    Cartesian undersampled k-space (:func:`cartesian_mask` along y, one mask for the stack,
    in the input's value scale)."""
    arr = np.asarray(img, dtype=np.float64)
    stack = arr[None] if arr.ndim == 2 else arr
    mask = cartesian_mask(stack.shape[1], acceleration, seed, center_fraction)
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(stack, axes=(1, 2))), axes=(1, 2))
    k[:, ~mask, :] = 0
    rec = np.abs(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(1, 2))), axes=(1, 2)))
    out = rec.astype(np.float32)
    return out[0] if arr.ndim == 2 else out


def foreground_mask(img: np.ndarray) -> np.ndarray:
    """Foreground of a magnitude image: above 10 % of its 99th percentile."""
    return img > 0.1 * np.percentile(img, 99)


def mr_noise(img: np.ndarray, snr: float, seed: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Add Rician noise with per-channel sigma = mean(foreground) / ``snr``.

    ``img`` is a magnitude image (2-D or 3-D); ``mask`` selects the foreground (default
    :func:`foreground_mask`).
    """
    if snr <= 0:
        raise ValueError("snr must be positive")
    img = np.asarray(img, dtype=np.float64)
    m = foreground_mask(img) if mask is None else mask
    sigma = float(img[m].mean()) / snr
    return rician(img, sigma, np.random.default_rng([seed, 7]))


def estimate_rician_sigma(img: np.ndarray, background: np.ndarray) -> float:
    """Sigma from a signal-free background: mean of a Rayleigh law is sigma sqrt(pi/2)."""
    return float(np.asarray(img)[background].mean() / np.sqrt(np.pi / 2))


def measure(n: int = 3, sizes: tuple[int, ...] = (256, 512),
            doses: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1)) -> list[dict[str, float]]:
    """Liver noise SD (HU) per dose and seconds per slice on *validation* abdomen phantoms.

    ``python -m engine.research.degrade`` prints this table (bench/results/engine_eval.md).
    """
    import time

    from engine.research.phantoms import Tissue, iter_dataset

    rows = []
    for size in sizes:
        sds: dict[float, list[float]] = {d: [] for d in doses}
        secs_one, secs_all = [], []
        for s in iter_dataset("val", n, size=size, kind="abdomen"):
            liver = ndimage.binary_erosion(s.labels[0] == Tissue.LIVER, iterations=3)
            t0 = time.perf_counter()
            low_dose_noise(s.ct_hu[0], s.spacing[1], (doses[-1],), seed=s.seed)
            secs_one.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            noise = low_dose_noise(s.ct_hu[0], s.spacing[1], doses, seed=s.seed)
            secs_all.append(time.perf_counter() - t0)
            for d in doses:
                sds[d].append(float(noise[d][liver].std()))
        row: dict[str, float] = {"size": size, "views": default_angles(size),
                                 "sec_one_dose": float(np.mean(secs_one)),
                                 "sec_all_doses": float(np.mean(secs_all))}
        row.update({f"sd_{d:g}": float(np.mean(v)) for d, v in sds.items()})
        rows.append(row)
    return rows


if __name__ == "__main__":  # pragma: no cover - measurement entry point
    for r in measure():
        print(
            " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())
        )
