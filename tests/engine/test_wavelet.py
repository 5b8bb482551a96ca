"""Haar DWT / IDWT: exact round trip, orthonormality, known coefficients."""
from __future__ import annotations

import pytest
import torch

from engine.wavelet import dwt2, idwt2, level_noise_scale, wavedec2, waverec2


def test_round_trip_exact() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 32, 48, generator=g, dtype=torch.float64)
    y = dwt2(x)
    assert y.shape == (3, 8, 16, 24)
    assert torch.allclose(idwt2(y), x, atol=1e-12)


def test_orthonormal_energy_and_white_noise() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 64, 64, generator=g, dtype=torch.float64)
    y = dwt2(x)
    assert torch.allclose((y ** 2).sum(), (x ** 2).sum(), rtol=1e-12)
    # white noise stays white with the same variance in every sub-band
    per_band = y.reshape(4, 4, 32, 32).var(dim=(0, 2, 3))
    assert torch.all((per_band - 1.0).abs() < 0.08), per_band


def test_known_coefficients() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    y = dwt2(x).flatten().tolist()
    assert y == pytest.approx([5.0, -1.0, -2.0, 0.0])  # LL, LH, HL, HH
    const = torch.full((1, 1, 4, 4), 3.0)
    c = dwt2(const)
    assert torch.allclose(c[:, 0], torch.full((1, 2, 2), 6.0))  # LL = 2 * mean
    assert torch.count_nonzero(c[:, 1:]) == 0


def test_multilevel_round_trip() -> None:
    x = torch.randn(2, 3, 64, 32, dtype=torch.float64)
    ll, det = wavedec2(x, 3)
    assert ll.shape == (2, 3, 8, 4)
    assert [d.shape[1:] for d in det] == [(9, 32, 16), (9, 16, 8), (9, 8, 4)]
    assert torch.allclose(waverec2(ll, det), x, atol=1e-12)


def test_errors_and_level_scale() -> None:
    with pytest.raises(ValueError):
        dwt2(torch.zeros(1, 1, 5, 4))
    with pytest.raises(ValueError):
        idwt2(torch.zeros(1, 3, 4, 4))
    assert [level_noise_scale(k) for k in (1, 2, 3)] == [1.0, 2.0, 4.0]
    with pytest.raises(ValueError):
        level_noise_scale(0)
