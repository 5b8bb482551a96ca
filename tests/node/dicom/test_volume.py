"""Volume assembly: sorting, splitting, rejection reasons, enhanced and compressed inputs."""
from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from engine.api import Intensity
from node.dicom.volume import (
    Reason,
    VolumeError,
    assemble,
    assemble_split,
    frames_of,
    intensity_of,
    to_stored,
)
from tests.support.factory import make_series, phantom_hu


def test_sorts_along_normal_and_maps_to_hu() -> None:
    series = make_series(8, shuffle=True)
    av = assemble(series)
    assert av.volume.data.shape == (8, 32, 32)
    assert av.volume.intensity is Intensity.HU
    assert av.volume.spacing == pytest.approx((2.5, 0.7, 0.8))
    # data equals the phantom in HU (rounded), in slice order
    expected = np.rint(phantom_hu(8, 32, 32))
    np.testing.assert_array_equal(av.volume.data, expected.astype(np.float32))
    z = [p[2] for p in av.geometry.positions]
    assert z == sorted(z)
    assert len(av.geometry.sources) == 8
    assert "PixelData" not in av.reference


def test_oblique_orientation_sorted_by_projection_not_z() -> None:
    ori = (1, 0, 0, 0, np.cos(0.5), -np.sin(0.5))
    series = make_series(6, orientation=ori, shuffle=True)
    av = assemble(series)
    normal = av.geometry.normal
    d = [float(np.dot(normal, p)) for p in av.geometry.positions]
    assert d == sorted(d)
    assert av.volume.spacing[0] == pytest.approx(2.5, abs=1e-3)


def test_reversed_stack_is_sorted_ascending() -> None:
    series = make_series(5, shuffle=False)
    av1 = assemble(series)
    av2 = assemble(list(reversed(series)))
    np.testing.assert_array_equal(av1.volume.data, av2.volume.data)


def test_mixed_orientation_rejected_and_split() -> None:
    a = make_series(4, shuffle=False)
    b = make_series(4, orientation=(0, 1, 0, 0, 0, -1), shuffle=False,
                    for_uid=a[0].FrameOfReferenceUID)
    for ds in b:
        ds.SeriesInstanceUID = a[0].SeriesInstanceUID
    with pytest.raises(VolumeError) as exc:
        assemble(a + b)
    assert exc.value.reason is Reason.MIXED_ORIENTATION
    vols, rejected = assemble_split(a + b)
    assert sorted(v.volume.data.shape[0] for v in vols) == [4, 4]
    assert rejected == []


def test_spacing_gap_rejected_and_split() -> None:
    series = make_series(10, shuffle=False)
    del series[4]
    with pytest.raises(VolumeError) as exc:
        assemble(series)
    assert exc.value.reason is Reason.SPACING_GAP
    vols, _ = assemble_split(series, min_slices=2)
    assert sorted(v.volume.data.shape[0] for v in vols) == [4, 5]


def test_different_sizes_rejected() -> None:
    a = make_series(3, rows=32, shuffle=False)
    b = make_series(3, rows=16, shuffle=False, for_uid=a[0].FrameOfReferenceUID,
                    origin=(-10, -20, 60))
    with pytest.raises(VolumeError) as exc:
        assemble(a + b)
    assert exc.value.reason is Reason.DIFFERENT_SIZES
    vols, _ = assemble_split(a + b)
    assert sorted(v.volume.data.shape[1] for v in vols) == [16, 32]


def test_missing_geometry_and_duplicates() -> None:
    series = make_series(3, shuffle=False)
    del series[1].ImagePositionPatient
    with pytest.raises(VolumeError) as exc:
        assemble(series)
    assert exc.value.reason is Reason.MISSING_GEOMETRY
    assert "Image Position" in str(exc.value)
    _, rejected = assemble_split(series)
    assert [r.reason for r in rejected] == [Reason.MISSING_GEOMETRY]
    dup = make_series(3, shuffle=False)
    dup.append(copy.deepcopy(dup[0]))
    dup[-1].SOPInstanceUID = pydicom.uid.generate_uid()
    with pytest.raises(VolumeError) as exc:
        assemble(dup)
    assert exc.value.reason is Reason.DUPLICATE_POSITION


def test_empty_and_mixed_frame_of_reference() -> None:
    with pytest.raises(VolumeError) as exc:
        assemble([])
    assert exc.value.reason is Reason.EMPTY
    a = make_series(3, shuffle=False)
    b = make_series(3, shuffle=False, origin=(-10, -20, 100))
    with pytest.raises(VolumeError) as exc:
        assemble(a + b)
    assert exc.value.reason is Reason.MIXED_FRAME_OF_REFERENCE


def test_real_ct_small() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    av = assemble([ds])
    assert av.volume.intensity is Intensity.HU
    raw = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(av.volume.data[0], raw)
    assert av.geometry.frame_of_reference_uid == ds.FrameOfReferenceUID
    assert av.geometry.sources[0].sop_instance_uid == ds.SOPInstanceUID


def test_real_mr_small() -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    av = assemble([ds])
    assert av.volume.intensity in (Intensity.MR, Intensity.MR_T1W, Intensity.MR_T2W)
    np.testing.assert_array_equal(av.volume.data[0], ds.pixel_array.astype(np.float32))


def test_enhanced_ct_functional_groups() -> None:
    path = get_testdata_file("eCT_Supplemental.dcm")
    if path is None:
        pytest.skip("pydicom-data not installed")
    ds = pydicom.dcmread(path)
    frames = frames_of(ds)
    assert len(frames) == 2
    assert frames[0].slope == 1.0 and frames[0].intercept == -1024.0
    av = assemble([ds])
    assert av.volume.data.shape == (2, 512, 512)
    assert av.geometry.sources[0].frame_number in (1, 2)
    assert {s.frame_number for s in av.geometry.sources} == {1, 2}
    raw = ds.pixel_array.astype(np.float32) - 1024
    d = [float(np.dot(av.geometry.normal, p)) for p in av.geometry.positions]
    assert d == sorted(d)
    first = av.geometry.sources[0].frame_number - 1
    np.testing.assert_array_equal(av.volume.data[0], raw[first])


def test_enhanced_mr_without_geometry_rejected() -> None:
    path = get_testdata_file("emri_small.dcm")
    if path is None:
        pytest.skip("pydicom-data not installed")
    ds = pydicom.dcmread(path)
    with pytest.raises(VolumeError) as exc:
        assemble([ds])
    assert exc.value.reason is Reason.MISSING_GEOMETRY


@pytest.mark.parametrize(
    "name", ["emri_small_jpeg_2k_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm",
             "emri_small_RLE.dcm"]
)
def test_compressed_frames_decode_like_uncompressed(name: str) -> None:
    ref_path, path = get_testdata_file("emri_small.dcm"), get_testdata_file(name)
    if path is None or ref_path is None:
        pytest.skip("pydicom-data not installed")
    ref = frames_of(pydicom.dcmread(ref_path))
    got = frames_of(pydicom.dcmread(path))
    assert len(got) == len(ref) == 10
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_array_equal(a.stored, b.stored)


def test_lossy_source_flagged() -> None:
    path = get_testdata_file("MR2_J2KI.dcm")
    if path is None:
        pytest.skip("pydicom-data not installed")
    j2k = pydicom.dcmread(path)  # JPEG 2000 irreversible: lossy by transfer syntax
    assert assemble([j2k]).geometry.lossy
    series = make_series(3, modality="MR", shuffle=False)
    for ds in series:
        ds.LossyImageCompression = "01"
    av = assemble(series)
    assert av.geometry.lossy
    assert not assemble(make_series(3, shuffle=False)).geometry.lossy


def test_intensity_heuristic() -> None:
    mr = make_series(1, modality="MR")[0]
    assert intensity_of(mr) is Intensity.MR_T2W
    mr.RepetitionTime, mr.EchoTime = "500", "15"
    assert intensity_of(mr) is Intensity.MR_T1W


def test_to_stored_round_trip_hu_exact() -> None:
    hu = np.rint(phantom_hu(3, 16, 16))
    sp = to_stored(hu, Intensity.HU)
    assert sp.slope == 1.0 and sp.intercept == -1024.0
    np.testing.assert_array_equal(sp.to_physical(), hu)
    low = hu.copy()
    low[0, 0, 0] = -3000
    sp = to_stored(low, Intensity.HU)
    assert sp.intercept == -3000.0
    np.testing.assert_array_equal(sp.to_physical(), low)


def test_to_stored_mr_scaling_and_nan() -> None:
    x = np.linspace(0, 1, 1000, dtype=np.float32).reshape(10, 10, 10)
    sp = to_stored(x, Intensity.MR_T2W)
    assert sp.array.max() == 4095
    assert np.max(np.abs(sp.to_physical() - x)) <= sp.slope / 2 + 1e-6
    with pytest.raises(ValueError):
        to_stored(np.array([[[np.nan]]]), Intensity.HU)


def test_pixel_padding_value_becomes_the_fov_mask() -> None:
    from tests.support.realdata import series_from_real_slice

    series = series_from_real_slice("693_UNCR.dcm", 2)
    stored = series[0].pixel_array
    av = assemble(series)
    assert av.volume.fov is not None
    np.testing.assert_array_equal(av.volume.fov[0], stored != -2000)
    assert av.volume.data[~av.volume.fov].max() == -3024.0
    # Pixel Padding Range Limit: every stored value between the two is padding
    for ds in series:
        ds.PixelPaddingRangeLimit = -1024  # stored -1024 = -2048 HU: the whole outside
    av = assemble(series)
    assert av.volume.fov is not None
    np.testing.assert_array_equal(av.volume.fov[0], ~((stored >= -2000) & (stored <= -1024)))
    # no padding declared: no mask
    assert assemble(series_from_real_slice("CT_small.dcm", 2)).volume.fov is None


def test_gantry_tilt_is_assembled_with_the_received_positions() -> None:
    tilt = 0.3  # rad: slice planes tilted, the table moves along z
    series = make_series(4, orientation=(1, 0, 0, 0, np.cos(tilt), -np.sin(tilt)),
                         shuffle=True)
    for ds in series:
        k = int(ds.InstanceNumber) - 1
        ds.ImagePositionPatient = [-10.0, -20.0, 30.0 + 2.5 * k]
        ds.GantryDetectorTilt = 17.19
    av = assemble(series)
    assert av.volume.spacing[0] == pytest.approx(2.5 * np.cos(tilt), rel=1e-4)
    z = [p[2] for p in av.geometry.positions]
    assert z == sorted(z) and z[0] == pytest.approx(30.0)  # the received positions, kept


def test_real_ct_as_12_bit_unsigned_with_another_rescale() -> None:
    from tests.support.realdata import series_from_real_slice

    series = series_from_real_slice("CT_small.dcm", 2)
    hu = assemble(series).volume.data
    for ds in series:  # the same HU as Bits Stored 12, unsigned, slope 0.5, intercept -1100
        stored = np.clip(np.rint((ds.pixel_array * float(ds.RescaleSlope)
                                  + float(ds.RescaleIntercept) + 1100) / 0.5), 0, 4095)
        ds.PixelData = stored.astype(np.uint16).tobytes()
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1100
        for kw in ("PixelPaddingValue", "SmallestImagePixelValue", "LargestImagePixelValue"):
            if kw in ds:
                del ds[kw]
    got = assemble(series).volume.data
    inside = hu < -1100 + 0.5 * 4095  # what 12 bits at slope 0.5 can hold
    np.testing.assert_allclose(got[inside], hu[inside], atol=0.5)


@pytest.mark.parametrize(("name", "reference", "lossy"), [
    ("693_J2KR.dcm", "693_UNCR.dcm", False),  # JPEG 2000 lossless, padding -2000
    ("MR_small_RLE.dcm", "MR_small.dcm", False),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", False),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm", False),
    ("693_J2KI.dcm", None, True),  # JPEG 2000 irreversible: decoded, flagged lossy
])
def test_real_compressed_slices_decode_like_uncompressed(name: str, reference: str | None,
                                                         lossy: bool) -> None:
    got = assemble([pydicom.dcmread(get_testdata_file(name))])
    assert got.geometry.lossy is lossy
    if reference is not None:
        ref = assemble([pydicom.dcmread(get_testdata_file(reference))])
        np.testing.assert_array_equal(got.volume.data, ref.volume.data)
        assert (got.volume.fov is None) == (ref.volume.fov is None)


def test_2d_multislice_mr_with_gaps() -> None:
    """2D multi-slice MR: an even gap between slices (spacing 6 mm, thickness 5 mm) is one
    volume at the received positions; non-contiguous positions (a skipped slice, two packages)
    are refused with their own reason, not the generic spacing gap."""
    series = make_series(6, modality="MR", spacing=6.0, shuffle=False)
    for ds in series:
        ds.MRAcquisitionType = "2D"
        ds.SliceThickness = 5.0
    av = assemble(series)
    assert av.volume.data.shape[0] == 6
    assert av.geometry.slice_spacing == pytest.approx(6.0)
    assert av.geometry.slice_thickness == pytest.approx(5.0)
    del series[2]  # a skipped slice: runs of 2 and 3
    with pytest.raises(VolumeError) as exc:
        assemble(series)
    assert exc.value.reason is Reason.MR_2D_NON_CONTIGUOUS
    assert "runs of [2, 3] slices" in str(exc.value)
    # ... or, asked for, one volume at the received positions naming its runs
    av = assemble(series, slice_runs=True)
    assert av.runs == ((0, 2), (2, 5)) and av.volume.data.shape[0] == 5
    assert av.geometry.slice_spacing == pytest.approx(6.0)
    assert [p[2] for p in av.geometry.positions] == pytest.approx(
        [float(ds.ImagePositionPatient[2]) for ds in series])
    assert assemble(series[:2], slice_runs=True).runs == ()  # contiguous: no runs
    for ds in series:  # the same positions in a 3D acquisition: the generic spacing gap
        ds.MRAcquisitionType = "3D"
    with pytest.raises(VolumeError) as exc:
        assemble(series)
    assert exc.value.reason is Reason.SPACING_GAP


def test_ct_stored_floor_connected_to_the_border_is_out_of_fov() -> None:
    """A cone-beam CT (docs/realdata.md, Varian OBI) stores raw 0 = its lowest value outside
    the reconstruction circle and for the air it clipped there, with no padding declared:
    the border-connected floor is out of the FOV; a clipped pocket inside the body is not."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32] - 15.5
    r = np.hypot(yy, xx)
    hu = np.where(r < 9, 40.0, -1040.0) + rng.normal(0, 20, (2, 32, 32))
    hu[:, 15:17, 15:17] = -1100.0  # an air pocket inside, clipped too
    series = make_series(hu=hu)
    for ds in series:  # unsigned, intercept -1000: raw 0 is the floor, -1000 HU
        stored = np.clip(np.rint(ds.pixel_array.astype(float) - 1024 + 1000), 0, 65535)
        ds.PixelData = stored.astype(np.uint16).tobytes()
        ds.RescaleIntercept = "-1000"
    vol = assemble(series).volume
    data = np.asarray(vol.data)
    assert vol.fov is not None
    outside = ~vol.fov
    assert outside[:, 0, 0].all() and (data[outside] == -1000).all()
    assert vol.fov[:, 15:17, 15:17].all() and vol.fov[:, r < 8].all()
    assert 0.5 < outside[:, r > 11].mean() < 1.0  # clipped noise, not every air pixel
    # low-dose air noise clipped at the floor (speckle, about half the air pixels): no mask,
    # the denoiser smooths it like the rest of the air
    speckle = make_series(hu=np.where(r < 9, 40.0, -1024.0) + rng.normal(0, 30, (2, 32, 32)))
    assert assemble(speckle).volume.fov is None
    # the floor above air (intercept -900): air noise at raw 0 is no floor of the scanner
    for ds in series:
        ds.RescaleIntercept = "-900"
    assert assemble(series).volume.fov is None
    # declared padding wins (here: none of its value present -> no mask at all)
    for ds in series:
        ds.RescaleIntercept = "-1000"
        ds.PixelPaddingValue = 65535
    assert assemble(series).volume.fov is None
    # MR is never floored
    mr = make_series(2, modality="MR")
    assert all(f.padding is None for ds in mr for f in frames_of(ds))
