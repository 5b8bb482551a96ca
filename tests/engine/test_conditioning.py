"""Input conditioning: field of view, air floor, body outline, padding to a size multiple."""
from __future__ import annotations

import numpy as np
import pytest

from engine.api import Intensity, Volume, run_task
from engine.conditioning import (
    AIR_HU,
    body_mask,
    condition,
    field_of_view,
    noise_sd,
    restore,
)
from tests.support.engine import tiny_model


def head(n: int = 64, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """A disc of tissue in air inside a reconstruction circle (-3024 outside), a thin
    U-shaped holder below it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n] - n / 2 + 0.5
    r = np.hypot(yy, xx)
    img = np.full((n, n), AIR_HU, np.float32)
    img[r < n * 0.3] = 40.0
    img[(r > n * 0.36) & (r < n * 0.40) & (yy > 0)] = 200.0  # holder: a thin shell
    img = img + rng.normal(0, noise, img.shape).astype(np.float32)
    img[r > n * 0.48] = -3024.0
    return img[None]


def test_out_of_fov_found_without_padding_tags_and_from_the_node_mask() -> None:
    data = head()
    vol = Volume(data, (2.0, 1.0, 1.0), Intensity.HU)
    fov = field_of_view(vol)
    np.testing.assert_array_equal(fov, data > -1500)
    given = np.ones_like(fov)
    given[:, :4] = False  # padding declared by the node
    fov2 = field_of_view(Volume(data, (2.0, 1.0, 1.0), Intensity.HU, fov=given))
    assert not fov2[:, :4].any() and (fov2 == (fov & given)).all()
    # an isolated low value inside the body is not out-of-FOV (not connected to the border)
    inner = data.copy()
    inner[0, 32, 32] = -3024.0
    assert field_of_view(Volume(inner, (2.0, 1.0, 1.0), Intensity.HU))[0, 32, 32]


def test_fov_must_match_the_data() -> None:
    with pytest.raises(ValueError, match="fov"):
        Volume(head(), (2.0, 1.0, 1.0), Intensity.HU, fov=np.ones((1, 8, 8), bool))


def test_floor_keeps_air_noise_and_raises_what_is_below_it() -> None:
    data = head(noise=50.0)
    data[0, 30, 30] = -2900.0  # not air noise: a streak inside the body
    cond = condition(Volume(data, (2.0, 1.0, 1.0), Intensity.HU), "ct_denoise")
    assert cond.floor is not None and cond.floor < -1150  # 4 SD of 50 HU
    assert cond.data[0, 30, 30] == pytest.approx(cond.floor)
    assert cond.data.min() >= cond.floor
    # out of the FOV the network sees air
    assert (cond.data[~cond.fov] == AIR_HU).all()
    assert noise_sd(data, cond.fov & (data < -800)) == pytest.approx(50.0, rel=0.2)


def test_body_mask_drops_a_thin_holder() -> None:
    data = head(n=128)
    body = body_mask(data, data > -1500, (2.0, 1.0, 1.0))
    yy, xx = np.mgrid[:128, :128] - 63.5
    r = np.hypot(yy, xx)
    assert body[0][r < 128 * 0.28].all()
    assert not body[0][(r > 128 * 0.36) & (r < 128 * 0.40)].any()


def test_restore_puts_padding_back_and_crops() -> None:
    data = head(n=40, noise=10.0)  # 40 px: padded to 48 for a multiple of 16
    vol = Volume(data, (2.0, 1.0, 1.0), Intensity.HU)
    cond = condition(vol, "ct_denoise", 16)
    assert cond.data.shape == (1, 48, 48) and cond.pad == ((4, 4), (4, 4))
    fake = Volume(np.zeros_like(cond.data), vol.spacing, vol.intensity)
    out = restore(fake, vol, cond)
    assert out.data.shape == data.shape
    np.testing.assert_array_equal(out.data[data < -1500], data[data < -1500])
    assert (out.data[data > -1500] == 0).all()


def test_ct_to_mr_outside_body_is_background_and_odd_sizes_run() -> None:
    m = tiny_model("ct_to_mr")
    data = head(n=72, noise=30.0)[:, :, :70]  # odd, non-square
    res = run_task("ct_to_mr", Volume(data, (2.0, 1.0, 1.0), Intensity.HU), model=m,
                   params={"steps": 1}, seed=0)
    out = res.outputs[0].data
    assert out.shape == data.shape
    body = body_mask(np.where(data > -1500, data, AIR_HU), data > -1500, (2.0, 1.0, 1.0))
    assert (out[~body] == 0).all()
    rec = res.provenance.extra["conditioning"]
    assert rec["padded_to"] == [80, 80] and rec["input_noise_sd"] > 20


def test_mr_padding_passes_through() -> None:
    m = tiny_model("mr_denoise")
    rng = np.random.default_rng(0)
    data = np.abs(rng.normal(300, 50, (2, 32, 32))).astype(np.float32)
    fov = np.ones(data.shape, bool)
    fov[:, :, :3] = False
    data[~fov] = 7.0  # a padding value
    out = run_task("mr_denoise", Volume(data, (3.0, 1.0, 1.0), Intensity.MR_T2W, fov=fov),
                   model=m, params={"steps": 1}, seed=0).outputs[0]
    assert (out.data[~fov] == 7.0).all() and out.data.min() >= 0
    assert out.fov is not None and (out.fov == fov).all()
