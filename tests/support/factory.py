"""Generated test series (no PHI: synthetic names and UIDs), built from scratch with pydicom.

A CT series is a tilted-free axial stack of a procedural phantom (air, water cylinder,
bone ring) in HU, stored unsigned with Rescale Intercept -1024; an MR series is the same
phantom in arbitrary units. Used by volume, series and dispatch tests. ``hu=`` stores a given
(z, y, x) stack instead (e.g. an ``engine.research.phantoms`` abdomen with simulated low dose, for the
end-to-end tests with the shipped models).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def phantom_hu(n: int, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:n, 0:rows, 0:cols]
    r = np.hypot((y - rows / 2) / (rows / 2), (x - cols / 2) / (cols / 2))
    hu = np.full((n, rows, cols), -1000.0)
    hu[r < 0.8] = 0.0 + 10 * (z[r < 0.8] % 3)
    hu[(r >= 0.7) & (r < 0.8)] = 900.0
    hu += rng.normal(0, 5, hu.shape)
    return hu.astype(np.float32)


def make_series(
    n: int = 8,
    rows: int = 32,
    cols: int = 32,
    *,
    modality: str = "CT",
    spacing: float = 2.5,
    pixel_spacing: Sequence[float] = (0.7, 0.8),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-10.0, -20.0, 30.0),
    shuffle: bool = True,
    study_uid: str | None = None,
    for_uid: str | None = None,
    seed: int = 0,
    hu: np.ndarray | None = None,
    body_part: str = "HEAD",
) -> list[Dataset]:
    """``n`` single-frame CT or MR Image Storage datasets (in shuffled order by default).

    ``hu``: store this (z, y, x) stack (HU for CT) instead of the procedural phantom; ``n``,
    ``rows`` and ``cols`` are then taken from its shape. Slice ``k`` of the stack lies at
    ``origin + k * spacing`` along the slice normal.
    """
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    for_uid = for_uid or generate_uid()
    if hu is None:
        hu = phantom_hu(n, rows, cols, seed)
    else:
        hu = np.asarray(hu, dtype=np.float32)
        n, rows, cols = hu.shape
    ori = np.asarray(orientation, dtype=float)
    normal = np.cross(ori[:3], ori[3:])
    out = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Phantom^Test"
        ds.PatientID = "PHANTOM001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = "ACC001"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Phantom study"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.SeriesDescription = f"{modality} phantom"
        ds.Modality = modality
        ds.BodyPartExamined = body_part
        ds.PatientPosition = "HFS"
        ds.Manufacturer = "Phantom Inc"
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionNumber = 1
        ds.ContentDate = "20260101"
        ds.ContentTime = "120000"
        pos = np.asarray(origin, dtype=float) + normal * spacing * k
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
        ds.SliceThickness = f"{spacing:g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        if modality == "CT":
            ds.RescaleIntercept = "-1024"
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
            ds.KVP = "120"
            stored = np.clip(np.rint(hu[k] + 1024), 0, 65535).astype(np.uint16)
        else:
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.RepetitionTime = "3000"
            ds.EchoTime = "90"
            ds.EchoTrainLength = "1"
            stored = np.clip(np.rint(hu[k] + 1024), 0, 4095).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        out.append(ds)
    if shuffle:
        rng = np.random.default_rng(seed + 1)
        out = [out[i] for i in rng.permutation(n)]
    return out
