"""Series built from one real scanner slice of pydicom's test data, keeping its real values:
padding (Pixel Padding Value), out-of-FOV values, its own rescale and pixel representation.
Only Gaussian noise (in physical units) is added to the non-padding pixels, and each copy gets
its own SOP Instance UID and a position along the slice normal."""
from __future__ import annotations

import copy

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

__all__ = ["real_slice", "series_from_real_slice"]


def real_slice(name: str) -> Dataset:
    """One pydicom test file, decoded (pixel data uncompressed, Explicit VR Little Endian)."""
    ds = pydicom.dcmread(get_testdata_file(name))
    arr = ds.pixel_array
    ds.PixelData = arr.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def series_from_real_slice(name: str, n: int, *, noise: float = 0.0, seed: int = 0,
                           spacing_mm: float = 2.5) -> list[Dataset]:
    """``n`` slices from the real slice ``name``; noise in physical units (HU for CT)."""
    base = real_slice(name)
    stored = base.pixel_array
    slope = float(base.get("RescaleSlope", 1) or 1)
    ppv = base.get("PixelPaddingValue")
    pad = stored == ppv if ppv is not None else np.zeros(stored.shape, dtype=bool)
    info = np.iinfo(stored.dtype)
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    ipp = [float(v) for v in base.get("ImagePositionPatient", [0.0, 0.0, 0.0])]
    ori = np.asarray([float(v) for v in base.get("ImageOrientationPatient",
                                                  [1, 0, 0, 0, 1, 0])])
    normal = np.cross(ori[:3], ori[3:])
    for k in range(n):
        ds = copy.deepcopy(base)
        noisy = stored.astype(np.float64) + rng.normal(0.0, noise / slope, stored.shape)
        values = np.where(pad, stored, np.clip(np.rint(noisy), info.min, info.max))
        ds.PixelData = values.astype(stored.dtype).tobytes()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [round(v, 4) for v in np.asarray(ipp) + k * spacing_mm * normal]
        ds.ImageOrientationPatient = [float(v) for v in ori]
        ds.InstanceNumber = k + 1
        ds.SliceThickness = spacing_mm
        out.append(ds)
    return out
