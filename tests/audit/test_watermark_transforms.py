"""Each transform of the issue at a small sample size (the full numbers are in bench/).

The transforms are the benchmark's own (tests/support/watermark_transforms.py), so the test and the
benchmark measure the same thing: lossless re-encoding through pydicom's encoders, lossy
JPEG 2000 10:1, bit-depth rescale, +-1 LSB noise, 8-bit windows saved as PNG, JPEG q90 / q75,
resize, crop, brightness / contrast.
"""
from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest

from audit.watermark import WatermarkKey, detect, embed, make_payload
from tests.support import watermark_transforms as wt

#: the benchmark's key (bench/bench_watermark.py derives it the same way)
KEY = WatermarkKey(hashlib.sha256(b"synthnode bench key").digest(), 7)


@pytest.fixture(scope="module")
def slices() -> list:
    """Three 256 x 256 crops of a real CT slice (pydicom-data 693_UNCR), flipped / shifted."""
    import pydicom
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file("693_UNCR.dcm"))
    arr = ds.pixel_array
    crops = [arr[40:296, 60:316], arr[200:456, 180:436][::-1], arr[128:384, 128:384][:, ::-1]]
    return [wt.Slice(np.ascontiguousarray(c), 16, True, 1.0, float(ds.RescaleIntercept), True, "693")
            for c in crops]


# resize 0.5x is the allowed exception; JPEG q75 of the wide lung window is beyond it.
MUST_DETECT = [t for t in wt.TRANSFORMS if t not in ("resize 0.5x", "jpeg q75 (lung)")]


@pytest.mark.parametrize("name", MUST_DETECT)
def test_transform_keeps_mark(slices: list, name: str) -> None:
    for i, s in enumerate(slices):
        payload = make_payload(KEY.key_id, 1000 + i)
        marked = embed(s.arr, KEY, payload, bits_stored=s.bits, signed=s.signed)
        img = wt.TRANSFORMS[name](s, marked, np.random.default_rng(i))
        det = detect(img, [KEY])
        assert det.marked, f"{name}: slice {i} score {det.score:.2f} < {det.threshold:.2f}"
        assert det.payload in (None, payload)  # never a wrong payload
        # The unmarked slice through the same transform stays below the threshold.
        neg = detect(wt.TRANSFORMS[name](s, s.arr, np.random.default_rng(i)), [KEY])
        assert not neg.marked and neg.payload is None


def test_lossless_codecs_are_bit_exact(slices: list) -> None:
    s = slices[0]
    marked = embed(s.arr, KEY, 5, bits_stored=s.bits, signed=s.signed)
    for name in ("rle", "jpeg-ls lossless", "j2k lossless"):
        out = wt.TRANSFORMS[name](s, marked, np.random.default_rng(0))
        assert np.array_equal(out, marked), name


def test_resize_half_detected_on_512(slices: list) -> None:
    """Resize 0.5x of a 512 x 512 slice (a 256 x 256 result) is found by the scale search."""
    import pydicom
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = pydicom.dcmread(get_testdata_file("693_UNCR.dcm")).pixel_array
    payload = make_payload(KEY.key_id, 9)
    marked = embed(arr, KEY, payload, bits_stored=16, signed=True)
    det = detect(wt.resize(marked, 0.5), [KEY])
    assert det.marked and det.scale == 0.5 and det.payload == payload


def test_regeneration_proxy_runs(slices: list) -> None:
    """Regeneration (noise + NLM) is a documented limit: only check it runs and never yields a
    wrong payload."""
    s = slices[0]
    payload = make_payload(KEY.key_id, 3)
    marked = embed(s.arr, KEY, payload, bits_stored=s.bits, signed=s.signed)
    det = detect(wt.regenerate(s, marked, np.random.default_rng(0)), [KEY])
    assert det.payload in (None, payload)


def test_wilson_interval() -> None:
    lo, hi = wt.wilson(0, 10000)
    assert lo == 0.0 and 0.0003 < hi < 0.0004
    lo, hi = wt.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
