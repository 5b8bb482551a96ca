"""Real scanner slices through assembly -> engine (shipped models) -> quality gate.

Series are built from single real slices of pydicom's test data with their real values kept
(Pixel Padding Value -2000 -> -3024 HU outside the reconstruction circle of ``693_UNCR.dcm``,
its head holder, GE ``CT_small.dcm``), plus Gaussian noise in HU. Checked: padding passes
through unchanged, air stays air, CT -> MR background is dark outside the body (head holder
included) with T1w tissue order, the gate holds none of them (zero false holds) and still
holds deliberately broken outputs.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from scipy import ndimage

from engine.api import Volume, run_task
from engine.conditioning import body_mask
from node.dicom.volume import Reason, VolumeError, assemble
from node.pipeline.quality import check
from tests.support.realdata import series_from_real_slice

WEIGHTS = Path(__file__).resolve().parents[3] / "engine" / "weights"
MODELS = {"ct_denoise": "ct-denoise-wreg", "ct_to_mr": "ct-to-mr-wreg",
          "mr_denoise": "mr-denoise-wreg"}
pytestmark = pytest.mark.skipif(not (WEIGHTS / "ct-denoise-wreg").is_dir(),
                                reason="shipped weights not present")


@functools.cache
def model(task: str):  # type: ignore[no-untyped-def]
    from engine.models import load_model_dir

    return load_model_dir(WEIGHTS / MODELS[task])


@functools.cache
def ct_series(name: str, noise: float) -> Volume:
    return assemble(series_from_real_slice(name, 2, noise=noise, seed=3)).volume


def run(task: str, vol: Volume) -> Volume:
    return run_task(task, vol, model=model(task), params=None, seed=1, device="cpu").outputs[0]


def clean_hu(name: str) -> np.ndarray:
    ds = pydicom.dcmread(get_testdata_file(name))
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


CT_CASES = [("693_UNCR.dcm", 0.0), ("693_UNCR.dcm", 25.0), ("693_UNCR.dcm", 80.0),
            ("CT_small.dcm", 25.0)]


@pytest.mark.parametrize(("name", "noise"), CT_CASES)
def test_ct_denoise_keeps_padding_and_air(name: str, noise: float) -> None:
    vol = ct_series(name, noise)
    out = run("ct_denoise", vol)
    if vol.fov is not None:  # padding pixels: the input's values, bit for bit
        assert (~vol.fov).any()
        np.testing.assert_array_equal(out.data[~vol.fov], vol.data[~vol.fov])
        assert out.data[~vol.fov].max() == -3024.0
    hu = clean_hu(name)
    air = (hu > -1100) & (hu < -990)
    if air.sum() > 1000:  # air stays air, whatever the noise: no shift from flooring
        assert abs(float(out.data[0][air].mean()) - float(hu[air].mean())) < 10.0
    report = check(out, vol)
    assert report.passed, report.reasons


@pytest.mark.parametrize(("name", "noise"), CT_CASES)
def test_ct_to_mr_background_dark_and_tissue_order(name: str, noise: float) -> None:
    vol = ct_series(name, noise)
    out = run("ct_to_mr", vol)
    hu = clean_hu(name)
    body = body_mask(np.asarray(hu, np.float32)[None], hu[None] > -1500, vol.spacing)[0]
    brain = body & (hu > 10) & (hu < 60)
    bone = body & (hu > 700)
    level = float(np.median(out.data[0][brain]))
    # outside the body (air, out-of-FOV, the head holder) is background; the outline of the
    # noisy input may differ from the clean one's by a pixel or two
    outside = ~ndimage.binary_dilation(body, iterations=3)
    assert float(out.data[0][outside].max()) == 0.0
    assert float(out.data[0][~body].mean()) < 0.02 * level
    # T1w tissue order: soft tissue brighter than cortical bone, bone brighter than air
    if bone.sum() > 200:
        assert level > 2.0 * float(np.median(out.data[0][bone]))
    report = check(out, vol)
    assert report.passed, report.reasons


def test_head_holder_is_not_body() -> None:
    hu = clean_hu("693_UNCR.dcm").astype(np.float32)
    body = body_mask(hu[None], hu[None] > -1500, (1.0, 0.478516, 0.478516))[0]
    holder = (hu > -500) & ~body
    # the holder's U shape below and beside the head: thousands of pixels above -500 HU
    assert holder.sum() > 3000
    # its two walls left and right of the head and its bottom below it are not body
    assert holder[:, :120].sum() > 1000 and holder[:, 420:].sum() > 1000
    assert holder[460:].sum() > 300 and not body[460:].any()
    assert body[250, 256] and not body[:, :120].any() and not body[:, 420:].any()


@pytest.mark.parametrize(("name", "n"), [("MR_small.dcm", 2), ("MR2_UNCR.dcm", 1),
                                         ("MR-SIEMENS-DICOM-WithOverlays.dcm", 1)])
def test_mr_denoise_real_vendors(name: str, n: int) -> None:
    vol = assemble(series_from_real_slice(name, n)).volume  # 64, 1024 and 484 px
    out = run("mr_denoise", vol)
    assert float(out.data.min()) >= 0.0
    report = check(out, vol)
    assert report.passed, report.reasons


def test_multiframe_without_geometry_is_refused_with_a_reason() -> None:
    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    with pytest.raises(VolumeError) as exc:
        assemble([ds])
    assert exc.value.reason is Reason.MISSING_GEOMETRY


# -- deliberately broken outputs are still held --------------------------------------------

def test_grey_air_ct_to_mr_is_held() -> None:
    vol = ct_series("693_UNCR.dcm", 25.0)
    out = run("ct_to_mr", vol)
    level = float(np.median(out.data[out.data > 0]))
    grey = np.where(out.data == 0, 0.8 * level, out.data).astype(np.float32)
    report = check(Volume(grey, out.spacing, out.intensity), vol)
    assert not report.passed
    assert "background" in report.checks


def test_changed_padding_is_held() -> None:
    vol = ct_series("693_UNCR.dcm", 25.0)
    out = run("ct_denoise", vol)
    assert vol.fov is not None
    data = np.where(vol.fov, out.data, np.float32(-1000.0))
    report = check(Volume(data, out.spacing, out.intensity), vol)
    assert "fov_changed" in report.checks


def test_shifted_air_and_out_of_range_are_held() -> None:
    vol = ct_series("693_UNCR.dcm", 25.0)
    out = run("ct_denoise", vol)
    hu = clean_hu("693_UNCR.dcm")
    data = out.data.copy()
    data[:, (hu > -1100) & (hu < -950)] += 120.0
    assert "air_shift" in check(Volume(data, out.spacing, out.intensity), vol).checks
    data = out.data.copy()
    data[:, 250:260, 250:260] = -2500.0  # inside the FOV, far below the input's range
    assert "hu_range" in check(Volume(data, out.spacing, out.intensity), vol).checks


@pytest.mark.parametrize("task", ["ct_denoise", "ct_to_mr"])
def test_enhanced_multiframe_ct_passes(task: str) -> None:
    # pydicom's eCT_Supplemental.dcm: Enhanced CT, 2 frames of 512 px through functional groups
    vol = assemble([pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))]).volume
    out = run(task, vol)
    report = check(out, vol)
    assert report.passed, report.reasons
