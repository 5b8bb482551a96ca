"""Orthonormal 2-D Haar wavelet transform in torch (wavelet-domain diffusion).

One level maps an image ``(B, C, H, W)`` to ``(B, 4C, H/2, W/2)``: for every input channel
``c`` the four sub-bands LL, LH, HL, HH are stored at channels ``4c .. 4c+3``. The transform
is orthonormal (each 2x2 block is multiplied by an orthogonal 4x4 matrix), so it preserves
energy, white Gaussian noise stays white with the same variance in every sub-band, and the
inverse is the transpose: the round trip is exact up to float rounding.

Wavelet diffusion models (WDM; Friedrich et al., 2024) run the denoiser on these
coefficients: a quarter of the spatial positions, so a UNet of the same width is ~4x cheaper
per forward (bench/results/engine_speed.md). Multi-level wavelet diffusion uses a per-level
schedule ``alpha_t(k) = alpha_t * 2**(k-1)``; :func:`level_noise_scale` gives that factor.
The shipped models use ONE level (k = 1, factor 1), so the schedule
reduces to the plain rectified-flow schedule; multi-level transforms are provided and
tested for experiments.

References
----------
A. Haar, "Zur Theorie der orthogonalen Funktionensysteme", Math. Ann. 69 (1910).
P.-F. Friedrich et al., "WDM: 3D Wavelet Diffusion Models for High-Resolution Medical Image
Synthesis", DGM4MICCAI 2024.
"""
from __future__ import annotations

import torch

__all__ = ["SUBBANDS", "dwt2", "idwt2", "level_noise_scale", "wavedec2", "waverec2"]

SUBBANDS = ("LL", "LH", "HL", "HH")


def _check(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"H and W must be even for a Haar level, got {tuple(x.shape[-2:])}")


def dwt2(x: torch.Tensor) -> torch.Tensor:
    """One level of the orthonormal 2-D Haar DWT.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, C, H, W)`` with even ``H`` and ``W``.

    Returns
    -------
    torch.Tensor
        ``(B, 4C, H/2, W/2)``; channel ``4c + k`` is sub-band ``SUBBANDS[k]`` of channel ``c``.
    """
    _check(x)
    a = x[..., 0::2, 0::2]
    b = x[..., 0::2, 1::2]
    c = x[..., 1::2, 0::2]
    d = x[..., 1::2, 1::2]
    ll = (a + b + c + d) * 0.5
    lh = (a - b + c - d) * 0.5  # detail across columns (vertical edges)
    hl = (a + b - c - d) * 0.5  # detail across rows (horizontal edges)
    hh = (a - b - c + d) * 0.5
    out = torch.stack((ll, lh, hl, hh), dim=2)  # (B, C, 4, H/2, W/2)
    return out.reshape(x.shape[0], 4 * x.shape[1], x.shape[2] // 2, x.shape[3] // 2)


def idwt2(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dwt2` (the transpose of an orthonormal transform).

    Parameters
    ----------
    y : torch.Tensor
        ``(B, 4C, h, w)`` sub-bands as produced by :func:`dwt2`.

    Returns
    -------
    torch.Tensor
        ``(B, C, 2h, 2w)``.
    """
    if y.ndim != 4 or y.shape[1] % 4:
        raise ValueError(f"expected (B, 4C, h, w), got shape {tuple(y.shape)}")
    b_, c4, h, w = y.shape
    s = y.reshape(b_, c4 // 4, 4, h, w)
    ll, lh, hl, hh = s[:, :, 0], s[:, :, 1], s[:, :, 2], s[:, :, 3]
    a = (ll + lh + hl + hh) * 0.5
    b = (ll - lh + hl - hh) * 0.5
    c = (ll + lh - hl - hh) * 0.5
    d = (ll - lh - hl + hh) * 0.5
    out = torch.empty(b_, c4 // 4, 2 * h, 2 * w, dtype=y.dtype, device=y.device)
    out[..., 0::2, 0::2] = a
    out[..., 0::2, 1::2] = b
    out[..., 1::2, 0::2] = c
    out[..., 1::2, 1::2] = d
    return out


def wavedec2(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Multi-level Haar decomposition (Mallat pyramid).

    Returns
    -------
    (ll, details)
        ``ll`` is the coarsest approximation ``(B, C, H/2^L, W/2^L)``; ``details[k-1]`` holds
        the three detail bands (LH, HL, HH) of level ``k`` as ``(B, 3C, H/2^k, W/2^k)``,
        finest level first.
    """
    if levels < 1:
        raise ValueError("levels must be >= 1")
    details: list[torch.Tensor] = []
    cur = x
    for _ in range(levels):
        y = dwt2(cur)
        b_, c4, h, w = y.shape
        s = y.reshape(b_, c4 // 4, 4, h, w)
        cur = s[:, :, 0]
        details.append(s[:, :, 1:].reshape(b_, 3 * (c4 // 4), h, w))
    return cur, details


def waverec2(ll: torch.Tensor, details: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`wavedec2`."""
    cur = ll
    for det in reversed(details):
        b_, c, h, w = cur.shape
        d = det.reshape(b_, c, 3, h, w)
        y = torch.cat((cur.unsqueeze(2), d), dim=2).reshape(b_, 4 * c, h, w)
        cur = idwt2(y)
    return cur


def level_noise_scale(level: int) -> float:
    """Per-level schedule factor: ``alpha_t(k) = alpha_t * 2**(k-1)``.

    Level 1 (the only level used by the shipped models) gives 1.0, i.e. the unmodified
    schedule.
    """
    if level < 1:
        raise ValueError("wavelet levels are numbered from 1")
    return float(2 ** (level - 1))
