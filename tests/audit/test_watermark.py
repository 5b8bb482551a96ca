"""audit.watermark: round trips, fidelity bounds, range safety, keys, ECC, null behaviour."""
from __future__ import annotations

import hashlib
import math
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from audit.watermark import (
    CURRENT_FORMAT,
    FORMAT_V1,
    WatermarkKey,
    codeword,
    core,
    detect,
    ecc,
    embed,
    embed_verified,
    make_payload,
    noise_sigma,
    pattern,
    payload_hex,
    sample_frames,
    split_payload,
    suggest_max_delta,
    threshold_for,
    valid_limits,
)

KEY = WatermarkKey(hashlib.sha256(b"test key").digest(), 5)
OTHER = [
    WatermarkKey(hashlib.sha256(b"other key").digest(), 6),
    WatermarkKey(hashlib.sha256(b"same id, other secret").digest(), 5),
    WatermarkKey.generate(5),
]


def _real_ct() -> np.ndarray:
    import pydicom
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(get_testdata_file("693_UNCR.dcm")).pixel_array  # int16, 14 bits


def _synthetic(shape: tuple[int, ...], dtype: type, bits: int, signed: bool, seed: int, sigma: float = 8.0) -> np.ndarray:
    """Smooth anatomy-like blobs plus Gaussian noise, filling part of the stored range."""
    rng = np.random.default_rng(seed)
    lo, hi = valid_limits(bits, signed, None)
    ny, nx = shape[-2:]
    yy, xx = np.mgrid[0:ny, 0:nx] / max(ny, nx)
    base = np.zeros(shape[-2:])
    for _ in range(6):
        cy, cx, r, a = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3), rng.uniform(-1, 1)
        base += a * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)
    mid = (lo + hi) / 2
    span = (hi - lo) / 8
    vol = mid + span * base + rng.normal(0, sigma, shape)
    return np.clip(np.rint(vol), lo, hi).astype(dtype)


# ----------------------------------------------------------------------------- keys


def test_key_file_round_trip_mode_0600(tmp_path: Path) -> None:
    key = WatermarkKey.generate(17)
    path = key.to_file(tmp_path / "k" / "wm.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    back = WatermarkKey.from_file(path)
    assert back == key and back.key_id == 17
    with pytest.raises(FileExistsError):
        key.to_file(path)
    assert "secret" not in repr(key)


def test_key_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        WatermarkKey(b"short", 1)
    with pytest.raises(ValueError):
        WatermarkKey(bytes(32), 256)
    bad = tmp_path / "bad.key"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(ValueError):
        WatermarkKey.from_file(bad)


def test_layout_is_pinned() -> None:
    """The keyed pattern must not drift (numpy stream, bin layout): old marks stay readable."""
    lay = pattern.layout(WatermarkKey(bytes(range(32)), 1))
    digest = hashlib.sha256(
        lay.sync_bins.astype("<i8").tobytes() + np.round(lay.sync_phase, 12).astype("<f8").tobytes()
        + lay.pay_bins.astype("<i8").tobytes() + np.round(lay.pay_phase, 12).astype("<f8").tobytes()
        + lay.scramble.tobytes()
    ).hexdigest()
    assert digest == PINNED_LAYOUT


PINNED_LAYOUT = "835dad26f1ed49806dd631dc93987c6b85f7fb9a798e145307e2c5efb6fe5c32"


# ----------------------------------------------------------------------------- ECC


def test_crc16_known_answer() -> None:
    assert ecc.crc16_ccitt(b"123456789") == 0x29B1  # CRC-16/CCITT-FALSE check value


def test_viterbi_corrects_errors() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        info = rng.integers(0, 2, ecc.INFO_BITS).astype(np.uint8)
        coded = ecc.conv_encode(info)
        assert coded.size == ecc.CODED_BITS == 140
        soft = 1.0 - 2.0 * coded
        flips = rng.choice(coded.size, 4, replace=False)[:4]
        flips = flips[np.argsort(flips)]
        if np.min(np.diff(flips)) < 12:  # keep errors separated by more than the free distance span
            continue
        soft[flips] *= -1
        assert np.array_equal(ecc.viterbi_decode(soft + rng.normal(0, 0.3, soft.size)), info)


def test_payload_helpers() -> None:
    p = make_payload(0xAB, 0x12_3456_789A)
    assert split_payload(p) == (0xAB, 0x12_3456_789A)
    assert payload_hex(p) == "ab123456789a"
    with pytest.raises(ValueError):
        make_payload(1, 1 << 40)


# ----------------------------------------------------------------------------- embed / detect


@pytest.mark.parametrize(
    ("dtype", "bits", "signed"),
    [(np.uint16, 12, False), (np.uint16, 16, False), (np.int16, 12, True), (np.int16, 16, True),
     (np.uint16, 10, False), (np.uint8, 8, False)],
)
def test_round_trip_dtypes(dtype: type, bits: int, signed: bool) -> None:
    arr = _synthetic((256, 256), dtype, bits, signed, seed=bits + signed)
    payload = make_payload(KEY.key_id, 0xDEADBEEF)
    marked = embed(arr, KEY, payload, bits_stored=bits, signed=signed)
    assert marked.dtype == arr.dtype and marked.shape == arr.shape
    delta = marked.astype(np.int64) - arr
    assert np.abs(delta).max() <= 2
    lo, hi = valid_limits(bits, signed, None)
    assert marked.min() >= lo and marked.max() <= hi
    mse = float(np.mean(delta.astype(float) ** 2))
    assert 10 * math.log10((2**bits - 1) ** 2 / mse) >= 50.0 or bits < 10
    det = detect(marked, [KEY])
    assert det.marked and det.payload == payload and det.key_id == KEY.key_id
    assert not detect(arr, [KEY]).marked


def test_round_trip_volume_and_rgb() -> None:
    vol = _synthetic((3, 256, 256), np.int16, 12, True, seed=9, sigma=10.0)
    payload = make_payload(KEY.key_id, 77)
    marked = embed(vol, KEY, payload, bits_stored=12, signed=True)
    assert marked.shape == vol.shape and np.abs(marked.astype(int) - vol).max() <= 2
    det = detect(marked, [KEY])  # frames pooled
    assert det.payload == payload
    grey = np.clip((marked[0].astype(float) + 300) / 3, 0, 255).astype(np.uint8)
    rgb = np.stack([grey] * 3, axis=-1)
    assert detect(np.concatenate([rgb, rgb], axis=0), [KEY]).marked


def test_real_ct_fidelity_and_detection() -> None:
    ct = _real_ct()
    payload = make_payload(KEY.key_id, 123)
    marked = embed(ct, KEY, payload, bits_stored=16, signed=True, max_delta=2)
    d = marked.astype(np.int64) - ct
    assert np.abs(d).max() <= 2
    assert 10 * math.log10(65535**2 / np.mean(d**2)) >= 50
    assert detect(marked, [KEY]).payload == payload


@pytest.mark.parametrize("max_delta", [1, 2, 5])
def test_max_delta_respected(max_delta: int) -> None:
    arr = _synthetic((128, 128), np.uint16, 12, False, seed=max_delta)
    marked = embed(arr, KEY, 1, bits_stored=12, signed=False, max_delta=max_delta)
    assert np.abs(marked.astype(int) - arr).max() == max_delta


def test_never_leaves_valid_range_no_wraparound() -> None:
    rng = np.random.default_rng(0)
    arr = np.where(rng.random((256, 256)) < 0.5, 0, 4095).astype(np.uint16)  # saturated both ends
    arr[:64] = rng.integers(0, 4096, (64, 256))
    marked = embed(arr, KEY, 42, bits_stored=12, signed=False)
    assert marked.min() >= 0 and marked.max() <= 4095
    assert np.abs(marked.astype(int) - arr).max() <= 2
    # A caller range (e.g. above pixel padding): values inside stay inside, values outside untouched.
    arr2 = rng.integers(0, 4096, (128, 128)).astype(np.uint16)
    m2 = embed(arr2, KEY, 42, bits_stored=12, signed=False, valid_range=(100, 4000))
    inside = (arr2 >= 100) & (arr2 <= 4000)
    assert m2[inside].min() >= 100 and m2[inside].max() <= 4000
    assert np.array_equal(m2[~inside], arr2[~inside])
    # Signed extremes.
    s = np.full((128, 128), -2048, np.int16)
    s[::2] = 2047
    ms = embed(s, KEY, 42, bits_stored=12, signed=True)
    assert ms.min() >= -2048 and ms.max() <= 2047


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    bits=st.sampled_from([8, 12, 16]),
    signed=st.booleans(),
    max_delta=st.integers(1, 8),
)
def test_range_property(seed: int, bits: int, signed: bool, max_delta: int) -> None:
    lo, hi = valid_limits(bits, signed, None)
    rng = np.random.default_rng(seed)
    dtype = np.int16 if signed else np.uint16
    arr = rng.integers(lo, hi + 1, (40, 70)).astype(dtype)
    arr[rng.random(arr.shape) < 0.3] = lo
    arr[rng.random(arr.shape) < 0.3] = hi
    m = embed(arr, KEY, int(rng.integers(0, 1 << 48)), bits_stored=bits, signed=signed, max_delta=max_delta)
    assert m.min() >= lo and m.max() <= hi
    assert np.abs(m.astype(np.int64) - arr).max() <= max_delta


def test_input_validation() -> None:
    arr = np.zeros((64, 64), np.uint16)
    with pytest.raises(TypeError):
        embed(arr.astype(float), KEY, 1, bits_stored=12, signed=False)
    with pytest.raises(ValueError):
        embed(arr, KEY, 1 << 48, bits_stored=12, signed=False)
    with pytest.raises(ValueError):
        embed(arr[0], KEY, 1, bits_stored=12, signed=False)
    with pytest.raises(ValueError):
        embed(arr, KEY, 1, bits_stored=12, signed=False, valid_range=(5000, 6000))
    with pytest.raises(ValueError):
        detect(arr, [])


def test_wrong_key_never_decodes() -> None:
    ct = _real_ct()
    for i in range(6):
        y, x = (i * 37) % 256, (i * 59) % 256
        crop = ct[y : y + 256, x : x + 256]
        marked = embed(crop, KEY, make_payload(KEY.key_id, i), bits_stored=16, signed=True)
        for other in OTHER:
            det = detect(marked, [other])
            assert det.payload is None and not det.marked
        both = detect(marked, [OTHER[0], KEY])  # key rotation: the right key is found
        assert both.key_id == KEY.key_id and both.payload == make_payload(KEY.key_id, i)


def _unmarked_images(n: int) -> list[np.ndarray]:
    ct = _real_ct()
    out = []
    rng = np.random.default_rng(11)
    for i in range(n):
        if i % 2:
            y, x = rng.integers(0, 256, 2)
            out.append(ct[y : y + 256, x : x + 256])
        else:
            out.append(_synthetic((192, 192), np.uint16, 12, False, seed=1000 + i, sigma=rng.uniform(2, 20)))
    return out


def test_unmarked_scores_below_threshold_and_uniform_bits() -> None:
    images = _unmarked_images(40)
    thr = threshold_for(1)
    bits = []
    for img in images:
        det = detect(img, [KEY])
        assert not det.marked and det.score < thr and det.payload is None
        bits.append(core.candidate_bits(img, KEY))
    allbits = np.concatenate(bits)
    ones = int(allbits.sum())
    # Binomial balance and a chi-square over the 16 nibble values.
    assert stats.binomtest(ones, allbits.size, 0.5).pvalue > 1e-3
    nibbles = allbits.reshape(-1, 4) @ np.array([8, 4, 2, 1])
    counts = np.bincount(nibbles, minlength=16)
    assert stats.chisquare(counts).pvalue > 1e-3
    # Per bit position (64 positions x 40 images): no position is stuck.
    per_pos = np.stack(bits).sum(axis=0)
    assert per_pos.min() > 3 and per_pos.max() < 37


def test_weighted_scores_standardised_on_unmarked() -> None:
    """The SNR-weighted sync correlation is normalised by its conditional null standard
    deviation: over every circular shift of unmarked images it has mean ~0 and sd ~1."""
    zs = []
    for img in _unmarked_images(16):
        g = core.folded_phase([core.whiten(img.astype(np.float32))])
        assert np.abs(g).max() <= CURRENT_FORMAT.weight_cap + 1e-9  # no bin dominates
        zs.append(core._sync_scores(g, KEY).ravel())
    z = np.concatenate(zs)
    assert abs(z.mean()) < 0.05
    assert 0.9 < z.std() < 1.1
    assert np.mean(z > 3.0) < 3 * stats.norm.sf(3.0)


def test_payload_energy_null_moments_with_weights() -> None:
    """Payload energy with per-bin weights: exact null mean / variance of |a1 cos + a2 cos|."""
    rng = np.random.default_rng(4)
    amp = rng.gamma(2.0, 1.0, (140, 2))
    th = rng.uniform(0.0, 2.0 * np.pi, (4000, 140, 2))
    e = core.payload_energy((amp * np.cos(th)).sum(-1), np.broadcast_to(amp, (4000, 140, 2)))
    assert abs(e.mean()) < 0.06 and 0.94 < e.std() < 1.06
    one = core.payload_energy((amp[:, :1] * np.cos(th[..., :1])).sum(-1), np.broadcast_to(amp[:, :1], (4000, 140, 1)))
    assert abs(one.mean()) < 0.06 and 0.94 < one.std() < 1.06
    r_tab, f_tab = core._abs_table()
    assert f_tab[0] == pytest.approx(2 / np.pi, abs=1e-5) and f_tab[-1] == pytest.approx(0.81056, abs=1e-4)


def test_threshold_is_bonferroni() -> None:
    t1 = threshold_for(1)
    assert 5.2 < t1 < 5.5
    assert threshold_for(3) > t1
    n_hyp = 64**2 + 128**2 + 32**2
    assert stats.norm.sf(t1) * n_hyp == pytest.approx(1e-3, rel=1e-6)


def test_noise_relative_max_delta() -> None:
    rng = np.random.default_rng(2)
    img = rng.normal(30000, 400, (128, 128))
    assert abs(noise_sigma(img) - 400) < 40
    assert suggest_max_delta(img, hu_calibrated=False) == 64  # 0.25 x 400 capped at 64
    assert suggest_max_delta(rng.normal(3000, 12, (64, 64)), hu_calibrated=False) == 3
    assert suggest_max_delta(img, hu_calibrated=True) == 2
    assert codeword(KEY, 5).size == 140


def _noise_host(n: int, size: int, sd: float, seed: int) -> np.ndarray:
    """A host the default bound cannot mark detectably: white noise of ``sd`` stored units."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(2048, sd, (n, size, size)), 0, 4095).astype(np.uint16)


def test_sample_frames() -> None:
    assert sample_frames(3).tolist() == [0, 1, 2]
    assert sample_frames(100, 8).tolist() == [0, 14, 28, 42, 57, 71, 85, 99]
    assert sample_frames(8, 8).tolist() == list(range(8))


def test_embed_verified_raises_bound_only_where_needed() -> None:
    """Frame 0 is smooth (found at the starting bound), frames 1-2 are white noise of sd 600
    where a 2-unit mark is lost: as single-frame units they are marked again with a doubled
    bound until found; the bound stays below half the noise and each unit's change is
    within its own bound."""
    host = _noise_host(3, 128, 600.0, 4)
    host[0] = _synthetic((128, 128), np.uint16, 12, False, 1)
    payload = make_payload(5, 77)
    assert not detect(embed(host[1], KEY, payload, bits_stored=12, signed=False, max_delta=2),
                      [KEY]).marked
    marked, rep = embed_verified(host, KEY, payload, units=[[0], [1], [2]], bits_stored=12,
                                 signed=False, max_delta=2)
    assert rep.verified and rep.detected == [True, True, True]
    assert rep.max_delta[0] == 2 and all(d > 2 for d in rep.max_delta[1:]) and rep.raised == 2
    assert all(d <= lim <= 0.5 * noise_sigma(host[k]) or d == 2
               for k, (d, lim) in enumerate(zip(rep.max_delta, rep.limit)))
    for k in range(3):
        change = np.abs(marked[k].astype(np.int64) - host[k]).max()
        assert change <= rep.max_delta[k]
        det = detect(marked[k], [KEY])
        assert det.marked and det.payload == payload


def test_embed_verified_reports_what_it_cannot_mark() -> None:
    """A noise fraction that keeps the limit at the starting bound: nothing is raised and the
    unit is reported as not detected (the caller's dispatch check would refuse it)."""
    host = _noise_host(1, 128, 600.0, 5)
    marked, rep = embed_verified(host, KEY, make_payload(5, 1), units=[[0]], bits_stored=12,
                                 signed=False, max_delta=2, noise_fraction=0.001)
    assert rep.max_delta == [2] and rep.limit == [2] and rep.detected == [False]
    assert not rep.verified and rep.raised == 0
    assert np.abs(marked.astype(np.int64) - host).max() <= 2


def test_embed_verified_pools_a_multiframe_unit() -> None:
    """One unit of many frames is judged on its pooled sample: the starting bound suffices
    where a single noisy frame would not, and every frame carries the mark."""
    host = _noise_host(24, 96, 150.0, 6)
    payload = make_payload(5, 99)
    assert not detect(embed(host[0], KEY, payload, bits_stored=12, signed=False, max_delta=16),
                      [KEY]).marked
    marked, rep = embed_verified(host, KEY, payload, units=[list(range(24))], bits_stored=12,
                                 signed=False, max_delta=16)
    assert rep.verified and rep.max_delta == [16] and rep.raised == 0
    assert detect(marked[sample_frames(24)], [KEY]).payload == payload
    assert np.array_equal(marked, embed(host, KEY, payload, bits_stored=12, signed=False,
                                        max_delta=16))


def test_embed_verified_validation() -> None:
    host = np.zeros((3, 64, 64), np.uint16)
    with pytest.raises(ValueError, match="partition"):
        embed_verified(host, KEY, 1, units=[[0], [1]], bits_stored=12, signed=False)
    with pytest.raises(ValueError, match="partition"):
        embed_verified(host, KEY, 1, units=[[0, 1], [1, 2]], bits_stored=12, signed=False)
    with pytest.raises(ValueError, match="3-D"):
        embed_verified(host[0], KEY, 1, units=[[0]], bits_stored=12, signed=False)


# ----------------------------------------------------------------------------- mark formats


def test_mark_format_is_frozen_and_versioned() -> None:
    """The format is one frozen object; unknown versions and bad parameters are refused."""
    import dataclasses

    from audit.watermark import FORMATS, MarkFormat, format_for

    with pytest.raises(dataclasses.FrozenInstanceError):
        CURRENT_FORMAT.strength = 3.0  # type: ignore[misc]
    assert format_for(CURRENT_FORMAT.version) is CURRENT_FORMAT
    assert set(FORMATS) >= {1, 2}
    with pytest.raises(ValueError, match="unknown watermark format"):
        format_for(99)
    with pytest.raises(ValueError):
        MarkFormat(version=3, sync_energy=1.5)


def test_old_format_marks_stay_readable() -> None:
    """A mark made with format 1 (sync 30 %, strength 1) is found, with its payload, by the
    default detector, which reads every registered format; both versions share one
    detection configuration, so the threshold does not grow."""
    from audit.watermark.format import readers

    img = _synthetic((256, 256), np.uint16, 12, False, 21)
    payload = make_payload(KEY.key_id, 777)
    v1 = embed(img, KEY, payload, bits_stored=12, signed=False, max_delta=4, fmt=FORMAT_V1)
    v2 = embed(img, KEY, payload, bits_stored=12, signed=False, max_delta=4)
    assert not np.array_equal(v1, v2)  # the formats embed differently
    assert len(readers()) == 1
    assert threshold_for(1) == threshold_for(1, formats=(CURRENT_FORMAT,))
    for marked in (v1, v2):
        det = detect(marked, [KEY])
        assert det.marked and det.payload == payload
        assert det.format_version == CURRENT_FORMAT.version
    assert not detect(img, [KEY]).marked


# ----------------------------------------------------------------------------- fidelity bound


def test_fidelity_bound_by_meaning() -> None:
    """HU outputs: 4 HU by default (in stored units through the Rescale Slope); other
    outputs: start at 2 stored units, may rise below the noise (0.5 x sd by default, off with
    0), never past the PSNR floor; the bound and the measured change / PSNR are what the
    ledger records."""
    from audit.watermark.fidelity import FidelityBound, measure, psnr_db

    b = FidelityBound()
    ct = _synthetic((2, 128, 128), np.uint16, 12, False, 3)
    assert b.limits(ct, hu=True) == (4, 4)
    assert b.limits(ct, hu=True, slope=2.0) == (2, 2)
    mr = _synthetic((2, 128, 128), np.uint16, 12, False, 4, sigma=200.0)
    assert FidelityBound(other_noise_fraction=0).limits(mr, hu=False, peak=4095) == (2, 2)
    start, ceiling = FidelityBound(other_noise_fraction=0.05).limits(mr, hu=False, peak=4095)
    assert start == 2 and 2 < ceiling <= 0.05 * noise_sigma(mr) + 1
    # 0.5 x sd (~100 units) would break 50 dB at 4,096 levels: the PSNR floor caps it
    assert b.limits(mr, hu=False, peak=4095) == (2, b.psnr_ceiling(4095))
    # a narrow 8-bit-like range: the PSNR floor caps the bound below 2 units
    assert b.limits(mr, hu=False, peak=255) == (1, 1)
    assert b.record(hu=True) == {"unit": "HU", "max_change": 4}
    assert b.record(hu=False)["min_psnr_db"] == 50
    assert FidelityBound(hu_max_change=2.5).record(hu=True)["max_change"] == "2.5"
    for bad in ({"hu_max_change": 0.5}, {"other_max_delta": 0}, {"min_psnr_db": 10.0},
                {"other_noise_fraction": 0.9}):
        with pytest.raises(ValueError):
            FidelityBound(**bad)  # type: ignore[arg-type]
    # embedding at the bound stays within it; the measurement reports it
    marked = embed(ct, KEY, 99, bits_stored=12, signed=False, max_delta=4)
    m = measure(ct, marked, slope=1.0, hu=True, peak=4095)
    assert m["max_change_stored"] == 4 and m["max_change_hu"] == 4
    assert float(m["psnr_range_db"]) < float(m["psnr_db"])
    assert float(m["psnr_db"]) == pytest.approx(min(psnr_db(c, k, 4095)
                                             for c, k in zip(ct, marked, strict=True)), abs=0.01)
    mrk = embed(mr, KEY, 99, bits_stored=12, signed=False, max_delta=2)
    assert float(measure(mr, mrk, hu=False, peak=4095)["psnr_db"]) >= 50.0


def test_series_pooling_finds_what_single_slices_miss() -> None:
    """An auditor checks a series: the slices of a marked series (a list, sizes may differ)
    are pooled; small, noisy slices whose single-slice scores stay below the threshold are
    found together, and an unmarked series is not flagged."""
    payload = make_payload(KEY.key_id, 4242)
    host = [_synthetic((128, 128), np.uint16, 12, False, 50 + i, sigma=40.0) for i in range(8)]
    host[3] = host[3][:112, :120]  # a cropped slice in the series
    marked = [embed(h, KEY, payload, bits_stored=12, signed=False, max_delta=2) for h in host]
    singles = [detect(m, [KEY]) for m in marked]
    pooled = detect(marked, [KEY])
    assert pooled.marked and pooled.score > max(d.score for d in singles) + 2.0
    assert pooled.payload in (None, payload)  # never a wrong payload
    assert not any(d.marked for d in singles)  # the case pooling is for
    assert not detect(host, [KEY]).marked
