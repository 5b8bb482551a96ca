"""Input conditioning: what the network sees of a real scan, and how its output is put back.

Real scanners produce values the networks never saw in training: pixels outside the
reconstruction field of view (FOV) at -2000 / -3024 HU or a Pixel Padding Value, air and lung
noise far below -1000 HU in low-dose CT, head holders and table tops outside the body. The
engine works on the field of view only and normalises the rest away before the network:

* **field of view** (:func:`field_of_view`): the mask the node passes in
  ``Volume.fov`` (padding pixels from Pixel Padding Value / Range Limit are False), combined
  for CT with the values no tissue or air can have: below :data:`OUT_OF_FOV_HU` and
  connected to the slice border (the corners outside the reconstruction circle).
  Out-of-FOV pixels are replaced by air before the network and **restored unchanged** after
  it (restoration and augmentation keep the input's padding values bit for bit).
* **air floor**: inside the FOV, CT values below air (-1000 HU) by more than
  :data:`FLOOR_NOISE_SDS` times the input's own noise SD (measured in its air, at least
  down to :data:`HU_FLOOR`) are not air noise (streaks, a missed out-of-FOV region); they are
  raised to that floor before the network. Air noise itself is left to the network, which
  removes it without bias: clipping it at -1024 HU instead shifted the restored air of a
  real head slice with 80 HU noise to -978 HU, the floor at -1000 - 4 SD keeps it at -999 HU
  (``tests/node/pipeline/test_real_slices.py``).
* **MR background**: MR outputs are magnitude images, so values below 0 are clamped to 0
  (background stays dark); out-of-FOV pixels are restored unchanged.
* **CT -> MR**: the body outline (:func:`body_mask`) is taken from the CT; outside it (air,
  out-of-FOV, head holder, table) the network sees air and the output is background (0).
  Inside it, noise above :data:`CT_TO_MR_NOISE_HU` (measured in the air around the body) is
  smoothed down to that level first: the tissue model was trained on inputs of that noise.
* **size**: rows and columns that are not a multiple of the network's (odd, 484 px ...) are
  padded with air / background outside the FOV and cropped back after the network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from engine.types import Intensity, Volume

__all__ = [
    "AIR_HU",
    "BODY_HU",
    "CT_TO_MR_NOISE_HU",
    "FLOOR_NOISE_SDS",
    "HU_FLOOR",
    "OUT_OF_FOV_HU",
    "Conditioned",
    "body_mask",
    "condition",
    "field_of_view",
    "noise_sd",
    "restore",
]

#: air in Hounsfield units
AIR_HU = -1000.0
#: the CT floor inside the FOV is at most this (air noise of a noise-free input stays)
HU_FLOOR = -1024.0
#: ... and below air by this many noise SDs of the input (air noise is left to the network)
FLOOR_NOISE_SDS = 4.0
#: CT values in this range (HU) are air or lung: where the input's noise is measured
AIR_RANGE_HU = (-1400.0, -800.0)
#: CT values below this, connected to the slice border, are outside the reconstruction FOV
#: (scanners write -2000 / -3024 HU there; air with 80 HU low-dose noise stays above -1400)
OUT_OF_FOV_HU = -1500.0
#: CT threshold of the body outline (soft tissue and fat are above, air and foam below)
BODY_HU = -500.0
#: opening radius (mm) that cuts thin shells (head holders, table edges) off the body
BODY_OPENING_MM = 3.0
#: components smaller than this fraction of the largest body component in the slice are
#: not body (two legs are both kept; a detached holder or cable is not)
BODY_MIN_FRACTION = 0.2
#: the input noise (HU SD) the CT -> MR tissue model was trained with; noisier inputs are
#: smoothed to it before the network
CT_TO_MR_NOISE_HU = 5.0
#: fewest pixels a region needs for a noise estimate
MIN_NOISE_PIXELS = 500

MR_KINDS = (Intensity.MR, Intensity.MR_T1W, Intensity.MR_T2W)


@dataclass(frozen=True)
class Conditioned:
    """The network's input and the masks that put its output back.

    data   what the network sees (float32, same shape as the volume)
    fov    True = inside the field of view (the engine's output is used there)
    body   CT -> MR only: True inside the body outline (elsewhere the output is background)
    noise_sd, smoothing_px   CT -> MR only: input noise measured, Gaussian sigma applied
    """

    data: np.ndarray
    fov: np.ndarray
    body: np.ndarray | None = None
    noise_sd: float | None = None
    smoothing_px: float = 0.0
    floor: float | None = None
    pad: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))  # rows, columns added

    def record(self) -> dict[str, object]:
        """JSON-able summary for the provenance."""
        rec: dict[str, object] = {"fov_fraction": round(float(self.fov.mean()), 4)}
        if self.body is not None:
            rec["body_fraction"] = round(float(self.body.mean()), 4)
        if self.noise_sd is not None:
            rec["input_noise_sd"] = round(self.noise_sd, 2)
        if self.smoothing_px:
            rec["input_smoothing_px"] = round(self.smoothing_px, 3)
        if self.floor is not None:
            rec["hu_floor"] = round(self.floor, 1)
        if any(sum(p) for p in self.pad):
            rec["padded_to"] = list(self.data.shape[1:])
        return rec


def _border_connected(mask: np.ndarray) -> np.ndarray:
    """Per slice: the parts of ``mask`` (z, y, x) that touch the slice border."""
    out = np.zeros_like(mask)
    for k in range(mask.shape[0]):
        labels, n = ndimage.label(mask[k])
        if not n:
            continue
        edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        edge = edge[edge > 0]
        out[k] = np.isin(labels, edge)
    return out


def field_of_view(volume: Volume) -> np.ndarray:
    """True where the engine's output is used: ``volume.fov`` (padding excluded by the node)
    and, for CT, not an out-of-FOV value (< :data:`OUT_OF_FOV_HU`, connected to the border)."""
    fov = (np.ones(volume.data.shape, dtype=bool) if volume.fov is None
           else np.asarray(volume.fov, dtype=bool).copy())
    if volume.intensity is Intensity.HU:
        fov &= ~_border_connected(volume.data < OUT_OF_FOV_HU)
    return fov


def _disk(radius_px: tuple[float, float]) -> np.ndarray:
    ry, rx = max(radius_px[0], 0.5), max(radius_px[1], 0.5)
    ny, nx = math.ceil(ry), math.ceil(rx)
    yy, xx = np.mgrid[-ny:ny + 1, -nx:nx + 1]
    return (yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0


def body_mask(data: np.ndarray, fov: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """The body outline of a CT volume (z, y, x), per slice: above :data:`BODY_HU` inside the
    FOV, opened by :data:`BODY_OPENING_MM` (thin holders and table edges fall off), components
    of at least :data:`BODY_MIN_FRACTION` of the largest, holes filled (lungs, sinuses)."""
    disk = _disk((BODY_OPENING_MM / spacing[1], BODY_OPENING_MM / spacing[2]))
    out = np.zeros(data.shape, dtype=bool)
    for k in range(data.shape[0]):
        m = (data[k] > BODY_HU) & fov[k]
        m = ndimage.binary_opening(m, structure=disk)
        labels, n = ndimage.label(m)
        if not n:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.flatnonzero(sizes >= BODY_MIN_FRACTION * sizes.max()) + 1
        out[k] = ndimage.binary_fill_holes(np.isin(labels, keep))
    return out


def noise_sd(data: np.ndarray, region: np.ndarray) -> float | None:
    """Noise SD from the median absolute difference of horizontal neighbours inside
    ``region`` (robust to edges; white noise assumed). None: too few pixels."""
    pairs = region[..., 1:] & region[..., :-1]
    if int(pairs.sum()) < MIN_NOISE_PIXELS:
        return None
    d = np.diff(data, axis=-1)[pairs]
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))


def _smooth(data: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px <= 0:
        return data
    return np.stack([ndimage.gaussian_filter(s, sigma_px) for s in data]).astype(np.float32)


def condition(volume: Volume, task: str, multiple: int = 1) -> Conditioned:
    """The network's input for ``task`` on ``volume`` (module docstring), its rows and
    columns padded with air / background (outside the FOV) up to a ``multiple``."""
    cond = _condition(volume, task)
    pad = tuple((d // 2, d - d // 2) for d in
                ((-n) % max(multiple, 1) for n in volume.data.shape[1:]))
    if not any(sum(p) for p in pad):
        return cond
    fill = AIR_HU if volume.intensity is Intensity.HU else 0.0
    width = ((0, 0), *pad)
    return replace(
        cond,
        data=np.pad(cond.data, width, constant_values=fill),
        fov=np.pad(cond.fov, width, constant_values=False),
        body=None if cond.body is None else np.pad(cond.body, width, constant_values=False),
        pad=pad,  # type: ignore[arg-type]
    )


def _crop(a: np.ndarray, pad: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
    (t, b), (left, r) = pad
    return a[:, t:a.shape[1] - b, left:a.shape[2] - r]


def _condition(volume: Volume, task: str) -> Conditioned:
    data = np.asarray(volume.data, dtype=np.float32)
    fov = field_of_view(volume)
    if volume.intensity is Intensity.HU:
        x = np.where(fov, data, np.float32(AIR_HU)).astype(np.float32)
        if task != "ct_to_mr":
            air = fov & (x > AIR_RANGE_HU[0]) & (x < AIR_RANGE_HU[1])
            sd0 = noise_sd(x, air) or 0.0
            floor = min(HU_FLOOR, AIR_HU - FLOOR_NOISE_SDS * sd0)
            return Conditioned(np.maximum(x, np.float32(floor)), fov, noise_sd=sd0, floor=floor)
        body = body_mask(x, fov, volume.spacing)
        air = fov & ~ndimage.binary_dilation(body, iterations=3) & (x < BODY_HU)
        measured = noise_sd(x, air)
        sd = measured if measured is not None else (noise_sd(x, body) or 0.0)
        # a Gaussian of sigma s px keeps 1 / (2 sqrt(pi) s) of white noise's SD
        sigma = (sd / (CT_TO_MR_NOISE_HU * 2.0 * math.sqrt(math.pi))
                 if sd > CT_TO_MR_NOISE_HU else 0.0)
        x = np.maximum(_smooth(x, sigma), np.float32(HU_FLOOR))
        x = np.where(body, x, np.float32(AIR_HU)).astype(np.float32)
        return Conditioned(x, fov, body, sd, sigma)
    # MR: padding / out-of-FOV becomes background for the network
    x = np.where(fov, data, np.float32(0.0)).astype(np.float32)
    return Conditioned(x, fov)


def restore(output: Volume, source: Volume, cond: Conditioned) -> Volume:
    """Put one network output back: out-of-FOV pixels take the input's values unchanged
    (same intensity meaning) or background 0 (CT -> MR); outside the CT body outline a
    synthesised MR is background (0); MR magnitude outputs are clamped to >= 0."""
    data = _crop(np.asarray(output.data, dtype=np.float32), cond.pad)
    fov = _crop(cond.fov, cond.pad)
    if output.intensity in MR_KINDS:
        data = np.maximum(data, np.float32(0.0))
    if cond.body is not None:
        data = np.where(_crop(cond.body, cond.pad), data, np.float32(0.0))
    elif output.intensity is source.intensity:
        data = np.where(fov, data, np.asarray(source.data, dtype=np.float32))
    else:
        data = np.where(fov, data, np.float32(0.0))
    return Volume(data.astype(np.float32, copy=False), output.spacing, output.intensity,
                  fov=source.fov if output.intensity is source.intensity else None)
