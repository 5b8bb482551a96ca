"""Perceptual fingerprints: the hash survives windowing, JPEG, resize and crop of a real CT
slice; the index finds the recorded slice among unrelated real and phantom slices, scores
unrelated queries below the match level, and reads ``output.created`` payloads."""
from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

from audit.watermark.fingerprint import (
    BITS,
    MATCH_DISTANCE,
    UNCROP_PADS,
    UNCROP_PENALTY,
    FingerprintIndex,
    hamming,
    query_hashes,
    rank_normalise,
    slice_fingerprint,
    slice_hash,
    volume_fingerprints,
)
from tests.support import watermark_transforms as wt


def _real(name: str) -> wt.Slice:
    import pydicom
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(str(get_testdata_file(name)))
    ct = ds.Modality == "CT"
    arr = ds.pixel_array
    return wt.Slice(arr if arr.ndim == 2 else arr[0], int(ds.BitsStored), int(ds.PixelRepresentation) == 1,
                    float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0)), ct, name)


@functools.cache
def _phantoms() -> list[wt.Slice]:
    from engine.research.phantoms import make_sample

    out = []
    for seed in (11, 12, 13):
        s = make_sample(seed, size=256, n_slices=4, kind="abdomen")
        for z in range(0, 4, 2):
            out.append(wt.Slice(wt.to_stored(s.ct_hu[z] + 1024.0, 12, False), 12, False, 1.0,
                                -1024.0, True, f"ph{seed}:{z}"))
            t1 = s.t1w[z] / max(float(s.t1w[z].max()), 1e-6) * 4000
            out.append(wt.Slice(wt.to_stored(t1, 12, False), 12, False, 1.0, 0.0, False,
                                f"t1{seed}:{z}"))
    return out


def test_rank_normalise_invariant_to_increasing_maps() -> None:
    x = np.random.default_rng(0).integers(0, 4096, (64, 64))
    assert np.allclose(rank_normalise(x), rank_normalise(3.0 * x + 100.0))
    assert np.allclose(rank_normalise(x), rank_normalise(np.sqrt(x)))
    assert len(slice_hash(x)) * 8 >= BITS


@pytest.mark.parametrize("transform", ["png window brain", "png window soft", "png window lung",
                                       "jpeg q75 (lung)", "jpeg q75 (soft)", "resize 0.5x",
                                       "crop <=10%/side", "contrast x1.5 (8-bit)"])
def test_identified_after_transform(transform: str) -> None:
    """A leaked rendering of a recorded CT slice is the closest candidate among unrelated real
    and phantom slices; the standard windows are matches (within the match distance)."""
    ct = _real("693_UNCR.dcm")
    others = [_real(n) for n in ("MR_small.dcm", "CT_small.dcm", "RG3_UNCR.dcm",
                                 "eCT_Supplemental.dcm")] + _phantoms()
    index = FingerprintIndex()
    for i, s in enumerate([ct, *others]):
        index.add(100 + i, f"series-{i}", f"sop-{i}", 0,
                  slice_fingerprint(s.arr, hu=s.ct, slope=s.slope, intercept=s.intercept))
    leaked = wt.TRANSFORMS[transform](ct, ct.arr, np.random.default_rng(3))
    best, second = index.search(leaked, k=2)
    assert best.series_uid == "series-0" and best.seq == 100 and best.sop_uid == "sop-0"
    assert best.distance < second.distance
    if transform.startswith("png window"):  # the recorded renderings themselves
        assert best.matched and best.distance <= MATCH_DISTANCE and best.score > 0


def test_crop_search_brings_a_cropped_slice_within_the_match_distance() -> None:
    """A crop of 5 % a side moves the plain hash far from the recorded one; the crop search
    (the query padded back with its edge values) finds the recorded slice within the match
    distance, first among unrelated real and phantom slices."""
    ct = _real("693_UNCR.dcm")
    others = [_real(n) for n in ("MR_small.dcm", "CT_small.dcm", "RG3_UNCR.dcm",
                                 "eCT_Supplemental.dcm")] + _phantoms()
    index = FingerprintIndex()
    for i, s in enumerate([ct, *others]):
        index.add(i, f"series-{i}", None, 0,
                  slice_fingerprint(s.arr, hu=s.ct, slope=s.slope, intercept=s.intercept))
    ny, nx = ct.arr.shape
    leaked = ct.arr[ny // 20: ny - ny // 20, nx // 20: nx - nx // 20]
    qs = query_hashes(leaked)
    assert len(qs) == 1 + len(UNCROP_PADS) and qs[0] == slice_hash(leaked)
    (plain,) = index.search_hash(qs[0], 1)
    (best,) = index.search(leaked, 1)
    assert plain.distance > MATCH_DISTANCE  # without the search: no match
    assert best.series_uid == "series-0" and best.matched and best.distance < plain.distance
    # an entry's distance: the plain one, or the searched one plus the penalty
    d = index.distances(qs)
    assert d[0] == min(index.distances(qs[0])[0],
                       min(int(index.distances(q)[0]) for q in qs[1:]) + UNCROP_PENALTY)


def test_unrelated_query_not_matched() -> None:
    """A slice that is not recorded gets no match (score below the match level)."""
    index = FingerprintIndex()
    for i, s in enumerate(_phantoms()):
        index.add(i, f"s{i}", None, 0, slice_fingerprint(s.arr, hu=s.ct, slope=s.slope,
                                                         intercept=s.intercept))
    for name in ("693_UNCR.dcm", "MR_small.dcm"):
        s = _real(name)
        (best,) = index.search(
            wt.TRANSFORMS["png window soft"](s, s.arr, np.random.default_rng(0)), k=1)
        assert not best.matched and best.distance > MATCH_DISTANCE


def test_index_reads_output_created_payloads() -> None:
    """Slice z of a single-frame series is instance z; of a multi-frame one, frame z + 1 of its
    one instance. Payloads without fingerprints (older outputs) add nothing."""
    vol = np.stack([p.arr for p in _phantoms()[:6:2]])
    fp = volume_fingerprints(vol, hu=True, slope=1.0, intercept=-1024.0)
    index = FingerprintIndex()
    n = index.add_event(5, {"output_series_uid": "1.2.3", "output_sop_uids": ["a", "b", "c"],
                            "output_format": "sc", "fingerprints": fp})
    n += index.add_event(6, {"output_series_uid": "1.2.4", "output_sop_uids": ["m"],
                             "output_format": "enhanced", "fingerprints": fp})
    assert n == 6 and index.add_event(7, {"output_series_uid": "x"}) == 0
    hits = index.search(vol[1], k=2)
    assert {(h.seq, h.sop_uid, h.slice_index) for h in hits} == {(5, "b", 1), (6, "m", 1)}
    assert all(h.distance == 0 for h in hits)
    a, b = (bytes.fromhex(fp["slices"][0][0]), bytes.fromhex(fp["slices"][1][0]))  # type: ignore[index]
    assert hamming(a, a) == 0 < hamming(a, b) <= BITS
