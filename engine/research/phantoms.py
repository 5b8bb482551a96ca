"""Procedural paired CT / MR phantoms rendered from one shared tissue label map.

No real paired CT/MR data exists offline, so the engine trains and is evaluated on phantoms:
a tissue label map is drawn first (abdomen: body outline, subcutaneous and visceral fat, muscle,
spine and ribs, liver with a vessel tree and lesions of several sizes including < 5 mm,
kidneys, spleen, aorta / IVC, bowel with gas; head: the MNI152 2009a symmetric grey / white
matter maps shipped inside nilearn, randomly warped, with CSF, skull, scalp and brain lesions),
then *both* modalities are rendered from the same labels and the same texture field, so the
pairs are aligned by construction:

* CT in Hounsfield units: per-tissue mean HU plus a per-tissue texture amplitude.
* MR T1w and T2w through the spin-echo signal equation
  ``S = PD * (1 - exp(-TR / T1)) * exp(-TE / T2)`` (e.g. Haacke et al., *Magnetic Resonance
  Imaging: Physical Principles and Sequence Design*, 1999, eq. 8.6 for TE << TR) with per-tissue
  PD / T1 / T2 at 1.5 T, a smooth multiplicative bias field and Rician magnitude noise
  (Gudbjartsson & Patz, MRM 34:910, 1995).

Relaxation times (ms, 1.5 T) are typical literature values: abdomen from de Bazelaire et al.,
Radiology 230:652 (2004) (liver 586/46, spleen 1057/79, kidney cortex 966/87, muscle 856/27 ->
rounded), blood from Stanisz et al., MRM 54:507 (2005) (1441/290), brain and CSF from
Stanisz 2005 / Wansapura et al., JMRI 9:531 (1999) (WM ~650/75, GM ~1100/95, CSF ~4000/2000),
fat ~260/80 (Bottomley et al., Med Phys 11:425, 1984 range). Bone is modelled as a dim mix of
cortex and marrow. Flow voids are not modelled (vessels render as static blood).

Seeds and splits
----------------
Every sample is a pure function of ``(seed, kind, size, n_slices, slice_spacing_mm, options)``
and :data:`PHANTOM_VERSION`. The numpy generator is ``default_rng([seed, KIND_CODE[kind],
PHANTOM_VERSION])``. :func:`iter_dataset` draws sample ``i`` of split ``s`` from
``seed = SPLIT_BASE[s] + i`` (``SPLIT_BASE = train 0, val 1e9, test 2e9``; ``i < 1e9``), so
train / val / test can never share a seed. :func:`split_of` inverts the scheme.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Literal, cast

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

PHANTOM_VERSION = 1
Kind = Literal["abdomen", "head"]
Split = Literal["train", "val", "test"]
KIND_CODE: dict[str, int] = {"abdomen": 1, "head": 2}
SPLIT_BASE: dict[str, int] = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}
SPLIT_SIZE = 1_000_000_000

ABDOMEN_FOV_MM = 360.0
HEAD_FOV_MM = 240.0

# Spin-echo sequence parameters (ms), typical clinical 1.5 T settings.
T1W_TR, T1W_TE = 500.0, 15.0
T2W_TR, T2W_TE = 4000.0, 100.0
MR_SCALE = 1000.0  # arbitrary units: S in [0, 1] * MR_SCALE


class Tissue(IntEnum):
    """Label values of the shared tissue map."""

    AIR = 0  # outside the body
    FAT = 1
    MUSCLE = 2
    BONE = 3
    LIVER = 4
    VESSEL = 5
    LESION = 6
    KIDNEY = 7
    SPLEEN = 8
    GAS = 9  # bowel gas
    CSF = 10
    GM = 11
    WM = 12
    SOFT = 13  # bowel wall, scalp, other soft tissue


@dataclass(frozen=True)
class TissueProps:
    """Mean HU, CT texture SD (HU), proton density (relative), T1 and T2 (ms, 1.5 T)."""

    hu: float
    hu_sd: float
    pd: float
    t1: float
    t2: float


# Portal-venous-phase contrast CT for the abdomen (liver ~100 HU, vessels ~170 HU).
TISSUES: dict[Tissue, TissueProps] = {
    Tissue.AIR: TissueProps(-1000.0, 0.0, 0.0, 1000.0, 1.0),
    Tissue.FAT: TissueProps(-100.0, 12.0, 0.90, 260.0, 80.0),
    Tissue.MUSCLE: TissueProps(50.0, 10.0, 0.70, 900.0, 35.0),
    Tissue.BONE: TissueProps(700.0, 120.0, 0.15, 550.0, 40.0),
    Tissue.LIVER: TissueProps(100.0, 8.0, 0.70, 586.0, 46.0),
    Tissue.VESSEL: TissueProps(170.0, 6.0, 0.90, 1441.0, 290.0),
    Tissue.LESION: TissueProps(40.0, 8.0, 0.85, 1200.0, 100.0),  # overridden per lesion
    Tissue.KIDNEY: TissueProps(150.0, 12.0, 0.85, 966.0, 87.0),
    Tissue.SPLEEN: TissueProps(110.0, 8.0, 0.80, 1057.0, 79.0),
    Tissue.GAS: TissueProps(-900.0, 40.0, 0.0, 1000.0, 1.0),
    Tissue.CSF: TissueProps(8.0, 3.0, 1.00, 4000.0, 2000.0),
    Tissue.GM: TissueProps(40.0, 4.0, 0.80, 1100.0, 95.0),
    Tissue.WM: TissueProps(28.0, 4.0, 0.70, 650.0, 75.0),
    Tissue.SOFT: TissueProps(35.0, 10.0, 0.75, 800.0, 55.0),
}


@dataclass(frozen=True)
class Lesion:
    """One spherical lesion: centre (z, y, x) in mm in the sample frame, diameter in mm."""

    index: int  # value in Sample.lesion_mask
    center_mm: tuple[float, float, float]
    diameter_mm: float
    organ: str
    hu: float
    pd: float
    t1: float
    t2: float


@dataclass
class Sample:
    """One phantom: aligned CT / MR / labels, arrays (z, y, x).

    ct_hu        float32, Hounsfield units (normal dose, no quantum noise)
    t1w, t2w     float32, arbitrary units (MR_SCALE), bias field and Rician noise applied
    labels       uint8, :class:`Tissue` values
    lesion_mask  int16, 0 = background, k = lesion with ``Lesion.index == k``
    spacing      (z, y, x) mm
    """

    seed: int
    kind: str
    ct_hu: np.ndarray
    t1w: np.ndarray
    t2w: np.ndarray
    labels: np.ndarray
    lesion_mask: np.ndarray
    spacing: tuple[float, float, float]
    lesions: list[Lesion] = field(default_factory=list)
    mr_snr: float | None = None
    bias_strength: float = 0.0


# --------------------------------------------------------------------------- helpers


def _grid(size: int, fov_mm: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Pixel-centre coordinates in mm; x to the patient's left (columns), y posterior (rows)."""
    d = fov_mm / size
    c = (np.arange(size, dtype=np.float64) - (size - 1) / 2.0) * d
    y, x = np.meshgrid(c, c, indexing="ij")
    return y, x, d


def _ellipse(
    y: np.ndarray, x: np.ndarray, cy: float, cx: float, b: float, a: float, theta: float = 0.0
) -> np.ndarray:
    """Mask of the ellipse centred (cy, cx) with semi-axes a (x) and b (y), rotated by theta."""
    dx, dy = x - cx, y - cy
    if theta:
        c, s = math.cos(theta), math.sin(theta)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    return (dx / a) ** 2 + (dy / b) ** 2 <= 1.0


class _SmoothWarp:
    """A smooth random displacement field: a sum of low-frequency sinusoids (mm)."""

    def __init__(self, rng: np.random.Generator, amplitude: float, wavelength: tuple[float, float],
                 terms: int = 4) -> None:
        self.k = rng.uniform(-1, 1, size=(terms, 2, 3))
        self.k /= np.linalg.norm(self.k, axis=2, keepdims=True)
        self.k *= (2 * np.pi / rng.uniform(*wavelength, size=(terms, 2, 1)))
        self.k[..., 0] *= 0.5  # slower along z
        self.phase = rng.uniform(0, 2 * np.pi, size=(terms, 2))
        self.amp = amplitude / math.sqrt(terms) * rng.uniform(0.5, 1.0, size=(terms, 2))

    def __call__(self, z: float, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dy = np.zeros_like(y)
        dx = np.zeros_like(x)
        for t in range(self.k.shape[0]):
            for comp, out in ((0, dy), (1, dx)):
                kz, ky, kx = self.k[t, comp]
                out += self.amp[t, comp] * np.sin(kz * z + ky * y + kx * x + self.phase[t, comp])
        return y + dy, x + dx


def _texture(rng: np.random.Generator, shape: tuple[int, int, int], d_mm: float,
             dz_mm: float) -> np.ndarray:
    """Zero-mean, unit-SD smooth texture: fine (~1 mm) plus coarse (~4 mm) Gaussian noise."""
    out = np.zeros(shape, dtype=np.float32)
    for sigma_mm, weight in ((1.0, 0.6), (4.0, 0.8)):
        noise = rng.standard_normal(shape).astype(np.float32)
        sig = (min(sigma_mm / dz_mm, 2.0) if shape[0] > 1 else 0.0,
               max(sigma_mm / d_mm, 0.5), max(sigma_mm / d_mm, 0.5))
        sm = ndimage.gaussian_filter(noise, sig, mode="wrap")
        out += weight * sm / (sm.std() + 1e-8)
    out /= out.std() + 1e-8
    return out


def _bias_field(rng: np.random.Generator, z_mm: np.ndarray, y: np.ndarray, x: np.ndarray,
                fov: float, strength: float) -> np.ndarray:
    """Smooth multiplicative coil-sensitivity field exp(strength * f), f in [-1, 1]."""
    if strength <= 0:
        return np.ones((len(z_mm), *y.shape), dtype=np.float32)
    c = rng.uniform(-1, 1, size=6)
    u, v = x / (fov / 2), y / (fov / 2)
    fields = []
    for z in z_mm:
        w = z / (fov / 2)
        fields.append(c[0] * u + c[1] * v + c[2] * u * v + c[3] * u * u + c[4] * v * v + c[5] * w)
    f = np.stack(fields)
    f /= np.abs(f).max() + 1e-8
    return np.exp(strength * f).astype(np.float32)


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise of SD ``sigma`` in each channel.

    Gudbjartsson & Patz, MRM 34:910 (1995): |S + n_r + i n_i|, n ~ N(0, sigma^2).
    """
    if sigma <= 0:
        return signal.astype(np.float32, copy=True)
    re = signal + rng.normal(0.0, sigma, signal.shape)
    im = rng.normal(0.0, sigma, signal.shape)
    return np.sqrt(re * re + im * im).astype(np.float32)


def spin_echo(pd: np.ndarray | float, t1: np.ndarray | float, t2: np.ndarray | float,
              tr: float, te: float) -> np.ndarray:
    """Spin-echo signal ``PD (1 - exp(-TR/T1)) exp(-TE/T2)`` (TE << TR approximation)."""
    return np.asarray(pd * (1.0 - np.exp(-tr / np.asarray(t1))) * np.exp(-te / np.asarray(t2)))


# --------------------------------------------------------------------------- abdomen


def _abdomen_labels(rng: np.random.Generator, size: int, z_mm: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, float]:
    """Label map (z, y, x) uint8 and the liver mask (before vessels / lesions)."""
    y0, x0, d = _grid(size, ABDOMEN_FOV_MM)
    warp = _SmoothWarp(rng, amplitude=4.0, wavelength=(80.0, 200.0))
    liver_warp = _SmoothWarp(rng, amplitude=7.0, wavelength=(50.0, 120.0))
    a = rng.uniform(135, 170)
    b = rng.uniform(95, 125)
    fat_t = rng.uniform(8, 28)
    wall_t = rng.uniform(6, 12)
    slope = rng.uniform(-0.15, 0.15, size=4)  # mm of change per mm of z for a few organs
    # bowel loops (anterior / left cavity), fixed across z with slow drift
    n_bowel = int(rng.integers(3, 8))
    bowel = [(rng.uniform(-0.55, -0.05), rng.uniform(-0.1, 0.7), rng.uniform(8, 20),
              rng.uniform(6, 16), rng.uniform(0, np.pi), rng.random() < 0.5,
              rng.uniform(-0.3, 0.3, 2)) for _ in range(n_bowel)]
    n_ribs = int(rng.integers(5, 10))
    rib_angles = np.sort(rng.uniform(-0.15 * np.pi, 1.15 * np.pi, n_ribs))  # posterior arc
    rib_drift = rng.uniform(-0.004, 0.004)
    kid_off = rng.uniform(45, 60), rng.uniform(-8, 8), rng.uniform(24, 30), rng.uniform(33, 42)
    kid_rot = rng.uniform(0.2, 0.6)
    spl = rng.uniform(0.5, 0.7), rng.uniform(0.15, 0.45), rng.uniform(22, 32), rng.uniform(38, 55)
    liv = (
        rng.uniform(0.3, 0.4),
        rng.uniform(-0.1, 0.05),
        rng.uniform(0.5, 0.62),
        rng.uniform(0.7, 0.85),
    )
    left_lobe = rng.uniform(0.4, 0.75)
    ao_r, ivc_a, ivc_b = rng.uniform(9, 13), rng.uniform(10, 14), rng.uniform(7, 10)
    vb_r = rng.uniform(16, 21)

    labels = np.zeros((len(z_mm), size, size), dtype=np.uint8)
    liver_mask = np.zeros_like(labels, dtype=bool)
    for k, z in enumerate(z_mm):
        y, x = warp(z, y0, x0)
        az, bz = a * (1 + 0.001 * slope[0] * z), b * (1 + 0.001 * slope[1] * z)
        lab = np.full((size, size), Tissue.AIR, dtype=np.uint8)
        body = _ellipse(y, x, 0, 0, bz, az)
        lab[body] = Tissue.FAT
        ai, bi = az - fat_t, bz - fat_t
        lab[_ellipse(y, x, 0, 0, bi, ai)] = Tissue.MUSCLE
        ac, bc = ai - wall_t, bi - wall_t
        cavity = _ellipse(y, x, 0, 0, bc, ac)
        lab[cavity] = Tissue.FAT  # visceral fat
        for (fy, fx, ra, rb, th, gas, drift) in bowel:
            cy, cx = fy * bc + drift[0] * z, fx * ac + drift[1] * z
            m = _ellipse(y, x, cy, cx, rb, ra, th) & cavity
            lab[m] = Tissue.SOFT
            if gas:
                lab[_ellipse(y, x, cy, cx, 0.6 * rb, 0.6 * ra, th) & cavity] = Tissue.GAS
        # spine: vertebral body, canal, posterior muscles and psoas
        vby = bc - vb_r - 18
        lab[_ellipse(y, x, vby + 32, -28, 18, 20) & body] = Tissue.MUSCLE  # paraspinal R
        lab[_ellipse(y, x, vby + 32, 28, 18, 20) & body] = Tissue.MUSCLE  # paraspinal L
        lab[_ellipse(y, x, vby - 2, -vb_r - 12, 14, 11, 0.3)] = Tissue.MUSCLE  # psoas R
        lab[_ellipse(y, x, vby - 2, vb_r + 12, 14, 11, -0.3)] = Tissue.MUSCLE  # psoas L
        # kidneys
        kz = z * slope[2] * 0.2
        for sgn in (-1, 1):
            lab[_ellipse(y, x, vby + kid_off[1] + kz, sgn * (vb_r + kid_off[0]), kid_off[3],
                         kid_off[2], sgn * kid_rot) & cavity] = Tissue.KIDNEY
        # spleen (patient left = +x)
        lab[_ellipse(y, x, spl[1] * bc + kz, spl[0] * ac, spl[3], spl[2], -0.5) & cavity] = \
            Tissue.SPLEEN
        # liver (patient right = -x), boundary wobbled by its own warp
        ly, lx = liver_warp(z, y, x)
        lz = 1 + 0.002 * slope[3] * z
        liver = (_ellipse(ly, lx, liv[1] * bc, -liv[0] * ac, liv[3] * bc * lz, liv[2] * ac * lz)
                 | _ellipse(ly, lx, -0.45 * bc, -0.05 * ac, 0.35 * bc, left_lobe * ac, 0.15))
        liver &= _ellipse(y, x, 0, 0, bc - 2, ac - 2)
        liver &= ~_ellipse(y, x, vby + 10, 0, vb_r + 22, vb_r + 30)  # keep off the spine
        lab[liver] = Tissue.LIVER
        liver_mask[k] = liver
        # great vessels
        lab[_ellipse(y, x, vby - vb_r - ao_r + 2, 14, ao_r, ao_r)] = Tissue.VESSEL  # aorta
        lab[_ellipse(y, x, vby - vb_r - ivc_b, -vb_r - 6, ivc_b, ivc_a)] = Tissue.VESSEL  # IVC
        # bones: vertebra, canal, ribs
        lab[_ellipse(y, x, vby, 0, vb_r * 0.9, vb_r)] = Tissue.BONE
        lab[_ellipse(y, x, vby + vb_r + 10, 0, 9, 8)] = Tissue.BONE  # posterior arch
        lab[_ellipse(y, x, vby + vb_r + 9, 0, 6, 5)] = Tissue.CSF  # canal
        lab[_ellipse(y, x, vby + vb_r + 26, 0, 10, 4)] = Tissue.BONE  # spinous process
        rr_a, rr_b = ai - wall_t / 2, bi - wall_t / 2
        for ang in rib_angles:
            t = ang + rib_drift * z
            cy, cx = rr_b * math.sin(t), rr_a * math.cos(t)
            lab[_ellipse(y, x, cy, cx, 4.5, 7.0, t + np.pi / 2)] = Tissue.BONE
        labels[k] = lab
    return labels, liver_mask, d


def _add_vessel_tree(rng: np.random.Generator, labels: np.ndarray, organ: np.ndarray,
                     z_mm: np.ndarray, d: float, fov: float) -> None:
    """Paint a branching tree of 3-D tubes (hepatic / portal vessels) inside ``organ``."""
    k_mid = len(z_mm) // 2
    ys, xs = np.nonzero(organ[k_mid])
    if len(ys) == 0:
        return
    c = (np.arange(labels.shape[1]) - (labels.shape[1] - 1) / 2.0) * d
    hy, hx = c[int(np.median(ys))], c[int(np.percentile(xs, 80))]  # hilum: medial part
    segs: list[tuple[np.ndarray, np.ndarray, float]] = []
    for _ in range(int(rng.integers(4, 8))):
        p0 = np.array([z_mm[k_mid] + rng.uniform(-5, 5), hy + rng.uniform(-15, 15),
                       hx + rng.uniform(-10, 5)])
        direction = np.array([rng.uniform(-0.6, 0.6), rng.uniform(-1, 1), rng.uniform(-1, 0.2)])
        direction /= np.linalg.norm(direction)
        length, radius = rng.uniform(40, 100), rng.uniform(2.0, 5.0)
        p1 = p0 + length * direction
        segs.append((p0, p1, radius))
        for _ in range(int(rng.integers(1, 4))):
            q0 = p0 + rng.uniform(0.3, 0.9) * (p1 - p0)
            dd = direction + rng.uniform(-0.9, 0.9, 3)
            dd /= np.linalg.norm(dd)
            segs.append((q0, q0 + rng.uniform(20, 50) * dd, radius * rng.uniform(0.4, 0.7)))
    for k, z in enumerate(z_mm):
        mask = np.zeros(labels.shape[1:], dtype=bool)
        for p0, p1, r in segs:
            if min(p0[0], p1[0]) - r > z or max(p0[0], p1[0]) + r < z:
                continue
            # only the segment's bounding box in the plane
            lo = np.searchsorted(c, np.minimum(p0[1:], p1[1:]) - r)
            hi = np.searchsorted(c, np.maximum(p0[1:], p1[1:]) + r)
            if hi[0] <= lo[0] or hi[1] <= lo[1]:
                continue
            yy, xx = np.meshgrid(c[lo[0]:hi[0]], c[lo[1]:hi[1]], indexing="ij")
            v = p1 - p0
            t = np.clip(((z - p0[0]) * v[0] + (yy - p0[1]) * v[1] + (xx - p0[2]) * v[2])
                        / (v @ v), 0.0, 1.0)
            dist2 = ((z - p0[0] - t * v[0]) ** 2 + (yy - p0[1] - t * v[1]) ** 2
                     + (xx - p0[2] - t * v[2]) ** 2)
            mask[lo[0]:hi[0], lo[1]:hi[1]] |= dist2 <= r * r
        labels[k][mask & organ[k]] = Tissue.VESSEL


# --------------------------------------------------------------------------- head


def _mni_dir() -> Path:
    """The folder of the MNI152 2009a templates bundled with nilearn (no download).

    These are the files that ``nilearn.datasets.load_mni152_{gm,wm,brain}_template`` read;
    they are opened with nibabel directly because importing ``nilearn.datasets`` costs ~10 s.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nilearn is required for head phantoms (it bundles MNI152 maps)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    if not (folder / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").exists():
        raise RuntimeError(f"nilearn's bundled MNI152 templates not found in {folder}")
    return folder


@functools.lru_cache(maxsize=1)
def _mni_labels() -> np.ndarray:
    """MNI152 head label volume (i, j, k) at 1 mm: GM / WM / CSF, skull, scalp."""
    import nibabel as nib

    folder = _mni_dir()

    def load(name: str) -> np.ndarray:
        # nib.load is typed as returning the FileBasedImage base; .nii.gz gives a Nifti1Image
        img = cast(
            "nib.Nifti1Image",
            nib.load(folder / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"),
        )
        return np.asarray(img.dataobj, dtype=np.float32) / 255.0

    gm, wm, t1 = load("gm"), load("wm"), load("t1")
    intracranial = ndimage.binary_fill_holes((t1 > 0.04) | (gm + wm > 0.2))
    intracranial = ndimage.binary_closing(intracranial, iterations=2)
    dist = ndimage.distance_transform_edt(~intracranial)  # mm outside the brain
    lab = np.zeros(gm.shape, dtype=np.uint8)
    lab[dist <= 14.0] = Tissue.SOFT  # scalp
    lab[dist <= 10.0] = Tissue.BONE  # skull
    lab[dist <= 3.0] = Tissue.CSF  # subarachnoid space
    lab[intracranial] = Tissue.CSF
    brain_gm = intracranial & (gm >= wm) & (gm > 0.35)
    brain_wm = intracranial & (wm > gm) & (wm > 0.35)
    lab[brain_gm] = Tissue.GM
    lab[brain_wm] = Tissue.WM
    return lab


def _head_labels(rng: np.random.Generator, size: int, z_mm: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """Axial slices of the randomly warped MNI152 head; returns labels and the brain mask."""
    vol = _mni_labels()
    y0, x0, d = _grid(size, HEAD_FOV_MM)
    centre = np.array([(vol.shape[0] - 1) / 2, (vol.shape[1] - 1) / 2 - 8, 0.0])
    centre[2] = rng.uniform(60, 140)  # axial level (voxel index, 1 mm)
    theta = rng.uniform(-0.2, 0.2)
    scale = rng.uniform(0.9, 1.1) * (1 + rng.uniform(-0.04, 0.04, 2))
    shift = rng.uniform(-8, 8, 2)
    tilt = rng.uniform(-0.08, 0.08, 2)
    warp = _SmoothWarp(rng, amplitude=3.5, wavelength=(40.0, 120.0))
    ct, st = math.cos(theta), math.sin(theta)
    labels = np.zeros((len(z_mm), size, size), dtype=np.uint8)
    for k, z in enumerate(z_mm):
        y, x = warp(z, y0, x0)
        xr, yr = ct * x + st * y, -st * x + ct * y
        xr, yr = xr / scale[1] + shift[1], yr / scale[0] + shift[0]
        coords = np.stack([
            centre[0] - xr,  # columns run to the patient's left; MNI i runs to the right
            centre[1] - yr,  # rows run posterior; MNI j runs anterior
            centre[2] + z + tilt[0] * xr + tilt[1] * yr,
        ])
        labels[k] = ndimage.map_coordinates(vol, coords, order=0, mode="constant", cval=0)
    brain = (labels == Tissue.GM) | (labels == Tissue.WM)
    return labels, brain, d


# --------------------------------------------------------------------------- lesions


def _lesion_diameters(rng: np.random.Generator, n: int) -> list[float]:
    """Always one < 5 mm, one 5-9 mm and one >= 10 mm, then random sizes 2.5-20 mm."""
    fixed = [rng.uniform(2.5, 4.5), rng.uniform(5.0, 9.0), rng.uniform(10.0, 25.0)]
    extra = [float(rng.uniform(2.5, 20.0)) for _ in range(max(0, n - 3))]
    return [float(v) for v in fixed + extra][:max(n, 3)]


def _add_lesions(rng: np.random.Generator, labels: np.ndarray, organ: np.ndarray,
                 z_mm: np.ndarray, d: float, organ_name: str, n: int,
                 lesion_mask: np.ndarray) -> list[Lesion]:
    """Place non-overlapping spherical lesions fully inside ``organ`` and paint them."""
    size = labels.shape[1]
    c = (np.arange(size) - (size - 1) / 2.0) * d
    yy, xx = np.meshgrid(c, c, indexing="ij")
    dz = float(z_mm[1] - z_mm[0]) if len(z_mm) > 1 else 1.0
    lesions: list[Lesion] = []
    # largest first so the big ones find room
    for diam in sorted(_lesion_diameters(rng, n), reverse=True):
        r = diam / 2
        placed = False
        for _ in range(20):
            k = int(rng.integers(0, len(z_mm)))
            free = organ[k] & (lesion_mask[k] == 0)
            inside = ndimage.distance_transform_edt(free) * d
            cand = np.argwhere(inside > r + 2.0 * d)
            if len(cand) == 0:
                continue
            iy, ix = cand[int(rng.integers(0, len(cand)))]
            cz = float(z_mm[k] + rng.uniform(-0.2, 0.2) * min(r, dz))
            centre = (cz, float(c[iy]), float(c[ix]))
            if any(math.dist(centre, les.center_mm) < r + les.diameter_mm / 2 + 2.0
                   for les in lesions):
                continue
            placed = True
            break
        if not placed:
            continue
        f = float(rng.uniform(0, 1))  # fluid fraction: solid (0) ... cyst (1)
        if organ_name == "liver":
            hu, t1, t2 = 55 - 45 * f, 1100 + 2400 * f, 90 + 1100 * f
        else:
            hu, t1, t2 = 35 - 22 * f, 1300 + 2200 * f, 120 + 1200 * f
        les = Lesion(index=len(lesions) + 1, center_mm=centre, diameter_mm=diam,
                     organ=organ_name, hu=hu, pd=0.8 + 0.2 * f, t1=t1, t2=t2)
        for kk, z in enumerate(z_mm):
            rr2 = r * r - (z - centre[0]) ** 2
            if rr2 <= 0:
                continue
            m = ((yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= rr2) & organ[kk]
            labels[kk][m] = Tissue.LESION
            lesion_mask[kk][m] = les.index
        lesions.append(les)
    return lesions


# --------------------------------------------------------------------------- render


def _render(labels: np.ndarray, lesion_mask: np.ndarray, lesions: list[Lesion],
            tex: np.ndarray, d_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CT (HU) and noise-free, bias-free T1w / T2w signal (0..1) from labels and texture."""
    n = max(int(t) for t in Tissue) + 1
    lut = np.zeros((5, n), dtype=np.float32)
    for t, p in TISSUES.items():
        lut[:, int(t)] = (p.hu, p.hu_sd, p.pd, p.t1, p.t2)
    hu, hu_sd, pd, t1, t2 = (lut[i][labels] for i in range(5))
    for les in lesions:
        m = lesion_mask == les.index
        hu[m], pd[m], t1[m], t2[m] = les.hu, les.pd, les.t1, les.t2
    ct = hu + hu_sd * tex
    pd_t = np.clip(pd * (1 + 0.04 * tex), 0, None)
    s1 = spin_echo(pd_t, t1, t2, T1W_TR, T1W_TE).astype(np.float32)
    s2 = spin_echo(pd_t, t1, t2, T2W_TR, T2W_TE).astype(np.float32)
    # partial-volume blur in plane (about half a pixel)
    sig = (0.0, 0.6, 0.6)
    ct = ndimage.gaussian_filter(ct, sig)
    s1 = ndimage.gaussian_filter(s1, sig)
    s2 = ndimage.gaussian_filter(s2, sig)
    return np.clip(ct, -1024, 3071).astype(np.float32), s1, s2


def make_sample(seed: int, size: int = 256, n_slices: int = 1, kind: Kind = "abdomen",
                slice_spacing_mm: float = 2.0, mr_snr: float | None = 40.0,
                bias_strength: float = 0.15, n_lesions: int | None = None) -> Sample:
    """Render one paired phantom.

    Parameters
    ----------
    seed
        Non-negative integer; the sample is a pure function of the arguments.
    size
        In-plane matrix (pixels); FOV is 360 mm (abdomen) or 240 mm (head).
    n_slices
        Number of contiguous axial slices; anatomy varies smoothly along z (2.5D context).
    kind
        ``"abdomen"`` or ``"head"``.
    slice_spacing_mm
        Distance between slice centres.
    mr_snr
        Rician noise: per-channel sigma = mean body signal / ``mr_snr``; ``None`` = no noise.
    bias_strength
        Bias field exp(strength * f), f in [-1, 1]; 0 = none.
    n_lesions
        Lesions to place (at least 3: one < 5 mm, one 5-9 mm, one >= 10 mm); default random 3-6.
    """
    if kind not in KIND_CODE:
        raise ValueError(f"kind must be one of {sorted(KIND_CODE)}, got {kind!r}")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    if size < 32 or n_slices < 1:
        raise ValueError("size must be >= 32 and n_slices >= 1")
    rng = np.random.default_rng([seed, KIND_CODE[kind], PHANTOM_VERSION])
    z_mm = (np.arange(n_slices) - (n_slices - 1) / 2.0) * slice_spacing_mm
    if kind == "abdomen":
        labels, organ, d = _abdomen_labels(rng, size, z_mm)
        _add_vessel_tree(rng, labels, organ, z_mm, d, ABDOMEN_FOV_MM)
        organ = organ & (labels == Tissue.LIVER)
        organ_name, fov = "liver", ABDOMEN_FOV_MM
    else:
        labels, organ, d = _head_labels(rng, size, z_mm)
        organ_name, fov = "brain", HEAD_FOV_MM
    lesion_mask = np.zeros(labels.shape, dtype=np.int16)
    n = int(rng.integers(3, 7)) if n_lesions is None else n_lesions
    lesions = _add_lesions(rng, labels, organ, z_mm, d, organ_name, n, lesion_mask)
    tex = _texture(rng, labels.shape, d, slice_spacing_mm)
    ct, s1, s2 = _render(labels, lesion_mask, lesions, tex, d)
    y, x, _ = _grid(size, fov)
    bias = _bias_field(rng, z_mm, y, x, fov, bias_strength)
    body = labels != Tissue.AIR
    t1w = s1 * bias * MR_SCALE
    t2w = s2 * bias * MR_SCALE
    if mr_snr is not None:
        if mr_snr <= 0:
            raise ValueError("mr_snr must be positive or None")
        t1w = rician(t1w, float(t1w[body].mean()) / mr_snr, rng)
        t2w = rician(t2w, float(t2w[body].mean()) / mr_snr, rng)
    return Sample(seed=seed, kind=kind, ct_hu=ct, t1w=t1w.astype(np.float32),
                  t2w=t2w.astype(np.float32), labels=labels, lesion_mask=lesion_mask,
                  spacing=(float(slice_spacing_mm), float(d), float(d)), lesions=lesions,
                  mr_snr=mr_snr, bias_strength=bias_strength)


# --------------------------------------------------------------------------- datasets


def split_seed(split: Split, index: int) -> int:
    """Seed of sample ``index`` of ``split``: ``SPLIT_BASE[split] + index``."""
    if split not in SPLIT_BASE:
        raise ValueError(f"split must be one of {sorted(SPLIT_BASE)}, got {split!r}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"index must be in [0, {SPLIT_SIZE})")
    return SPLIT_BASE[split] + index


def split_of(seed: int) -> str:
    """Inverse of :func:`split_seed`: which split a seed belongs to."""
    for name, base in SPLIT_BASE.items():
        if base <= seed < base + SPLIT_SIZE:
            return name
    raise ValueError(f"seed {seed} is outside every split")


def iter_dataset(split: Split, n: int, size: int = 256, n_slices: int = 1,
                 kind: Kind | Literal["mixed"] = "abdomen", start: int = 0,
                 **kwargs: object) -> Iterator[Sample]:
    """Yield ``n`` samples of ``split`` (indices ``start .. start + n - 1``).

    ``kind="mixed"`` alternates abdomen (even index) and head (odd index). Extra keyword
    arguments go to :func:`make_sample`.
    """
    for i in range(start, start + n):
        k: Kind = ("abdomen" if i % 2 == 0 else "head") if kind == "mixed" else kind  # type: ignore[assignment]
        yield make_sample(split_seed(split, i), size=size, n_slices=n_slices, kind=k,
                          **kwargs)  # type: ignore[arg-type]
