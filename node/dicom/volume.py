"""Volume assembly: DICOM instances of one series -> :class:`engine.api.Volume` + geometry.

The node converts DICOM to and from the engine's array contract here (design section 2).

* Slices are sorted by their position along the slice normal: the normal is the cross
  product of the row and column direction cosines of Image Orientation (Patient)
  (0020,0037) and the distance of a slice is the dot product of the normal with Image
  Position (Patient) (0020,0032) (PS3.3 C.7.6.2.1.1).
* Inconsistent input is split into stacks (different Frame of Reference, orientation,
  matrix size or pixel spacing; gaps in the slice spacing) or rejected with a
  :class:`VolumeError` that carries a machine-readable ``reason`` and a sentence for people.
* Multi-frame (enhanced) inputs are read frame by frame through the Shared / Per-frame
  Functional Groups (PS3.3 C.7.6.16): Plane Position, Plane Orientation, Pixel Measures and
  Pixel Value Transformation macros.
* Compressed pixel data are decoded by pydicom's pixel handlers (pylibjpeg, openjpeg, RLE,
  JPEG-LS are installed).
* Padding pixels (Pixel Padding Value / Range Limit, PS3.3 C.7.5.1.1.2) are passed to the
  engine as ``Volume.fov`` False: the engine leaves them out and the output keeps them. So is
  a CT's *stored floor* where no padding is declared (:func:`floor_mask`).
* Stored values map to physical intensity by the Modality LUT: Rescale Slope / Intercept
  (PS3.3 C.11.1.1.2), or the first linear Real World Value Mapping item (PS3.3 C.7.6.16.2.11)
  when no rescale is present. :func:`to_stored` maps back for output.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from pydicom.dataset import Dataset

from engine.api import Intensity, Volume
from node.dicom.codes import LOSSY_COMPRESSION_YES, LOSSY_TRANSFER_SYNTAXES
from storage.synthetic import is_synthetic

logger = logging.getLogger(__name__)

#: direction cosines closer than this are "the same orientation"
ORIENTATION_TOL = 1e-3
#: relative tolerance on slice spacing before a difference counts as a gap
SPACING_REL_TOL = 0.05
#: absolute tolerance (mm) on slice spacing
SPACING_ABS_TOL = 0.01


class Reason(str, Enum):
    """Why a set of instances could not become one volume."""

    EMPTY = "empty"
    MISSING_GEOMETRY = "missing_geometry"
    MIXED_ORIENTATION = "mixed_orientation"
    MIXED_FRAME_OF_REFERENCE = "mixed_frame_of_reference"
    DIFFERENT_SIZES = "different_sizes"
    DIFFERENT_PIXEL_SPACING = "different_pixel_spacing"
    SPACING_GAP = "spacing_gap"
    #: 2D multi-slice MR whose slice positions are not one evenly spaced stack (several
    #: packages, skipped slices): its slices are not one volume
    MR_2D_NON_CONTIGUOUS = "mr_2d_non_contiguous"
    DUPLICATE_POSITION = "duplicate_position"
    NOT_GRAYSCALE = "not_grayscale"
    NO_PIXEL_DATA = "no_pixel_data"
    UNDECODABLE = "undecodable"


class VolumeError(ValueError):
    """Instances cannot be assembled into one volume; ``reason`` says why."""

    def __init__(self, reason: Reason, message: str) -> None:
        self.reason = reason
        super().__init__(f"{reason.value}: {message}")


@dataclass(frozen=True)
class SourceRef:
    """A referenced source image: instance and, for multi-frame sources, the frame (1-based)."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None = None


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of a :class:`engine.api.Volume` lie, and where they came from.

    ``positions`` and ``sources`` are per slice, in the order of ``Volume.data`` (ascending
    distance along ``normal``). ``pixel_spacing`` is (row spacing, column spacing) in mm as in
    Pixel Spacing (0028,0030).
    """

    orientation: tuple[float, float, float, float, float, float]
    positions: tuple[tuple[float, float, float], ...]
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    slice_thickness: float | None
    rows: int
    columns: int
    frame_of_reference_uid: str | None
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    sources: tuple[SourceRef, ...]
    lossy: bool = False
    synthetic: bool = False
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0

    @property
    def normal(self) -> np.ndarray:
        row = np.asarray(self.orientation[:3], dtype=float)
        col = np.asarray(self.orientation[3:], dtype=float)
        return np.cross(row, col)


@dataclass(frozen=True)
class AssembledVolume:
    """The engine's input volume, its geometry and a header-only reference dataset
    (Patient / Study modules for the output builder; no pixel data)."""

    volume: Volume
    geometry: Geometry
    reference: Dataset = field(repr=False)
    #: 2D multi-slice MR with non-contiguous positions (``assemble(..., slice_runs=True)``):
    #: the (start, stop) slice ranges of ``volume`` that are each one evenly spaced stack; the
    #: engine runs on each on its own (its 2.5D context never spans a gap). Empty: one stack.
    runs: tuple[tuple[int, int], ...] = ()


@dataclass
class _Frame:
    stored: np.ndarray  # 2-D stored values
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    slope: float
    intercept: float
    ref: SourceRef
    frame_of_reference_uid: str | None
    rows: int
    columns: int
    # True = padding pixel (PS3.3 C.7.5.1.1.2) or a CT's stored floor (floor_mask)
    padding: np.ndarray | None = None


# -- reading -----------------------------------------------------------------------------


def _floats(value: object) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        seq = list(value)  # type: ignore[call-overload]
    except TypeError:
        seq = [value]
    if not seq:
        return None
    try:
        return tuple(float(v) for v in seq)
    except (TypeError, ValueError):
        return None


def _first(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None or keyword not in ds:
        return None
    seq = ds[keyword].value
    return seq[0] if seq else None


def _rwvm_linear(item: Dataset | None) -> tuple[float, float] | None:
    """Slope / intercept of the first linear Real World Value Mapping item, if any."""
    rw = _first(item, "RealWorldValueMappingSequence")
    if rw is None:
        return None
    if "RealWorldValueSlope" in rw and "RealWorldValueIntercept" in rw:
        return float(rw.RealWorldValueSlope), float(rw.RealWorldValueIntercept)
    return None


def _rescale(item: Dataset) -> tuple[float, float] | None:
    if "RescaleSlope" in item and item.RescaleSlope is not None:
        intercept = item.get("RescaleIntercept", 0.0)
        return float(item.RescaleSlope), float(intercept if intercept is not None else 0.0)
    return None


def _is_lossy(ds: Dataset) -> bool:
    """Lossy Image Compression (0028,2110) is "01", or the transfer syntax is lossy."""
    if str(ds.get("LossyImageCompression", "")) == LOSSY_COMPRESSION_YES:
        return True
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return ts is not None and str(ts) in LOSSY_TRANSFER_SYNTAXES


def _pixels(ds: Dataset) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise VolumeError(
            Reason.NO_PIXEL_DATA, f"instance {ds.get('SOPInstanceUID')} has no pixel data"
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1 or str(
        ds.get("PhotometricInterpretation", "MONOCHROME2")
    ) not in (
        "MONOCHROME1",
        "MONOCHROME2",
    ):
        raise VolumeError(
            Reason.NOT_GRAYSCALE,
            f"photometric interpretation {ds.get('PhotometricInterpretation')!r} is not grayscale",
        )
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom raises a variety of handler errors
        raise VolumeError(
            Reason.UNDECODABLE, f"pixel data of {ds.get('SOPInstanceUID')} cannot be decoded: {exc}"
        ) from exc


def padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Padding pixels of stored values (PS3.3 C.7.5.1.1.2): equal to Pixel Padding Value
    (0028,0120), or with Pixel Padding Range Limit (0028,0121) within the range the two
    values span (inclusive). None when the instance declares no padding or none is present."""
    ppv = ds.get("PixelPaddingValue")
    if ppv is None or isinstance(ppv, bytes):
        return None
    lo = hi = int(ppv)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is not None and not isinstance(limit, bytes):
        lo, hi = min(lo, int(limit)), max(lo, int(limit))
    values = stored.astype(np.int64, copy=False)
    mask = (values >= lo) & (values <= hi)
    return mask if mask.any() else None


#: air in HU: a CT stored floor at or below it is the scanner's clip / out-of-FOV value
FLOOR_MAX_HU = -1000.0
#: a floor region must hold a square of this many pixels a side (not clipped noise speckle)
FLOOR_MIN_WIDTH_PX = 5


def floor_mask(ds: Dataset, stored: np.ndarray, slope: float,
               intercept: float) -> np.ndarray | None:
    """CT without Pixel Padding Value: pixels holding the lowest stored value the Pixel
    Representation and Bits Stored allow, when that value is at or below air
    (:data:`FLOOR_MAX_HU`), in solid regions (opened by a :data:`FLOOR_MIN_WIDTH_PX` square)
    connected to the slice border. None when there are none.

    A cone-beam CT (the Varian OBI head series of docs/realdata.md: unsigned, Rescale
    Intercept -1000) stores raw 0 both outside its reconstruction circle and for the air it
    clipped there; no padding is declared. Those pixels carry no information below the floor:
    they are passed to the engine as out-of-FOV (kept bit for bit, no watermark there; the
    denoiser wrote up to 34 HU of texture into the flat region). Clipped pixels inside the
    body (an air bubble) are not connected to the border and stay in the field of view."""
    if str(ds.get("Modality", "")).upper() != "CT" or "PixelPaddingValue" in ds:
        return None
    bits = int(ds.get("BitsStored", 0) or 0) or stored.dtype.itemsize * 8
    floor = -(1 << (bits - 1)) if int(ds.get("PixelRepresentation", 0) or 0) == 1 else 0
    if floor * slope + intercept > FLOOR_MAX_HU:
        return None
    at = stored == floor
    if not at.any():
        return None
    from scipy import ndimage

    # only solid floor regions: low-dose air noise clipped at the floor is speckle, which
    # the denoiser should smooth like the rest of the air (a 5 x 5 opening removes it)
    at = ndimage.binary_opening(at, structure=np.ones((FLOOR_MIN_WIDTH_PX,) * 2, bool))
    labels, _ = ndimage.label(at)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    mask = np.isin(labels, edge[edge > 0])
    return mask if mask.any() else None


def _padding(ds: Dataset, stored: np.ndarray, slope: float,
             intercept: float) -> np.ndarray | None:
    pad = padding_mask(ds, stored)
    return pad if pad is not None else floor_mask(ds, stored, slope, intercept)


def frames_of(ds: Dataset) -> list[_Frame]:
    """Split one instance into frames with their geometry and rescale (PS3.3 C.7.6.16)."""
    arr = _pixels(ds)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    sop_class = str(ds.get("SOPClassUID", ""))
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    for_uid = ds.get("FrameOfReferenceUID")
    for_uid = str(for_uid) if for_uid else None
    rows, cols = int(ds.Rows), int(ds.Columns)
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if n_frames == 1 and arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.shape[0] != n_frames:
        raise VolumeError(Reason.UNDECODABLE, f"{n_frames} frames declared, {arr.shape[0]} decoded")

    top_rescale = _rescale(ds) or _rwvm_linear(ds) or (1.0, 0.0)
    out: list[_Frame] = []
    for i in range(n_frames):
        pf = per_frame[i] if per_frame is not None and i < len(per_frame) else None

        def group(keyword: str, pf: Dataset | None = pf) -> Dataset | None:
            return _first(pf, keyword) or _first(shared, keyword)

        pos_item = group("PlanePositionSequence")
        ori_item = group("PlaneOrientationSequence")
        meas_item = group("PixelMeasuresSequence")
        pvt_item = group("PixelValueTransformationSequence")
        rw = _rwvm_linear(pf) or _rwvm_linear(shared)
        position = _floats(pos_item.get("ImagePositionPatient")) if pos_item else None
        position = position or _floats(ds.get("ImagePositionPatient"))
        orientation = _floats(ori_item.get("ImageOrientationPatient")) if ori_item else None
        orientation = orientation or _floats(ds.get("ImageOrientationPatient"))
        spacing = _floats(meas_item.get("PixelSpacing")) if meas_item else None
        spacing = spacing or _floats(ds.get("PixelSpacing"))
        thick = _floats(meas_item.get("SliceThickness")) if meas_item else None
        thick = thick or _floats(ds.get("SliceThickness"))
        slope, intercept = (_rescale(pvt_item) if pvt_item else None) or rw or top_rescale
        out.append(
            _Frame(
                stored=arr[i],
                position=tuple(position) if position and len(position) == 3 else None,  # type: ignore[arg-type]
                orientation=orientation if orientation and len(orientation) == 6 else None,
                pixel_spacing=(spacing[0], spacing[1]) if spacing and len(spacing) == 2 else None,
                thickness=thick[0] if thick else None,
                slope=slope,
                intercept=intercept,
                ref=SourceRef(sop_class, sop_uid, i + 1 if n_frames > 1 else None),
                frame_of_reference_uid=for_uid,
                rows=rows,
                columns=cols,
                padding=_padding(ds, arr[i], slope, intercept),
            )
        )
    return out


# -- what is not part of a volume ------------------------------------------------------------


def leave_out_reason(ds: Dataset) -> str | None:
    """Why an object of a received series is not part of its volume, or None (it is).

    Read from the header only (no pixel data needed): localizers / scouts (Image Type
    (0008,0008) contains LOCALIZER), burned-in annotation (Burned In Annotation (0028,0301)
    YES: text in the pixels), secondary captures (dose screens, report pages, screenshots:
    Secondary Capture SOP classes) and objects that are not images at all (dose reports and
    other structured reports, presentation states: SOP class not an Image Storage)."""
    from pydicom.uid import UID

    sop = UID(str(ds.get("SOPClassUID", "")))
    name = sop.keyword or str(sop)
    if sop and not name.endswith("ImageStorage"):
        return f"not an image ({sop.name if sop.is_valid else name}): e.g. a dose report"
    if "SecondaryCapture" in name:
        return "secondary capture (dose screen, report page or screenshot)"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return "localizer / scout (Image Type LOCALIZER)"
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        return "burned-in annotation (Burned In Annotation YES)"
    return None


# -- grouping and sorting ------------------------------------------------------------------


def _same_orientation(a: Sequence[float], b: Sequence[float]) -> bool:
    return bool(np.allclose(np.asarray(a), np.asarray(b), atol=ORIENTATION_TOL))


def _stack_key(f: _Frame) -> tuple[object, ...]:
    return (
        f.frame_of_reference_uid,
        tuple(round(v / ORIENTATION_TOL) * ORIENTATION_TOL for v in f.orientation or ()),
        f.rows,
        f.columns,
        tuple(round(v, 4) for v in f.pixel_spacing or ()),
    )


def _check_geometry(frames: Sequence[_Frame]) -> None:
    for f in frames:
        missing = [
            name
            for name, value in (
                ("Image Position (Patient)", f.position),
                ("Image Orientation (Patient)", f.orientation),
                ("Pixel Spacing", f.pixel_spacing),
            )
            if value is None
        ]
        if missing:
            frame = f" frame {f.ref.frame_number}" if f.ref.frame_number else ""
            raise VolumeError(
                Reason.MISSING_GEOMETRY,
                f"instance {f.ref.sop_instance_uid}{frame} lacks {', '.join(missing)}",
            )


def _check_uniform(frames: Sequence[_Frame]) -> None:
    first = frames[0]
    for f in frames[1:]:
        if f.frame_of_reference_uid != first.frame_of_reference_uid:
            raise VolumeError(
                Reason.MIXED_FRAME_OF_REFERENCE,
                f"Frame of Reference {f.frame_of_reference_uid} differs from "
                f"{first.frame_of_reference_uid}",
            )
        if not _same_orientation(f.orientation or (), first.orientation or ()):
            raise VolumeError(
                Reason.MIXED_ORIENTATION,
                f"orientation {f.orientation} differs from {first.orientation}",
            )
        if (f.rows, f.columns) != (first.rows, first.columns):
            raise VolumeError(
                Reason.DIFFERENT_SIZES,
                f"matrix {f.rows}x{f.columns} differs from {first.rows}x{first.columns}",
            )
        assert f.pixel_spacing is not None and first.pixel_spacing is not None
        if not np.allclose(f.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-4):
            raise VolumeError(
                Reason.DIFFERENT_PIXEL_SPACING,
                f"pixel spacing {f.pixel_spacing} differs from {first.pixel_spacing}",
            )


def _distances(frames: Sequence[_Frame]) -> np.ndarray:
    ori = np.asarray(frames[0].orientation, dtype=float)
    normal = np.cross(ori[:3], ori[3:])
    return np.array([float(np.dot(normal, np.asarray(f.position, dtype=float))) for f in frames])


def _runs(dist: np.ndarray) -> list[slice]:
    """Split sorted distances into runs of uniform spacing; raise on duplicates."""
    if len(dist) < 2:
        return [slice(0, len(dist))]
    steps = np.diff(dist)
    if np.any(steps < SPACING_ABS_TOL):
        i = int(np.argmax(steps < SPACING_ABS_TOL))
        raise VolumeError(
            Reason.DUPLICATE_POSITION, f"two slices at {dist[i]:.3f} mm along the normal"
        )
    nominal = float(np.median(steps))
    runs: list[slice] = []
    start = 0
    for i, step in enumerate(steps):
        if abs(step - nominal) > max(SPACING_ABS_TOL, SPACING_REL_TOL * nominal):
            runs.append(slice(start, i + 1))
            start = i + 1
    runs.append(slice(start, len(dist)))
    return runs


# -- intensity -----------------------------------------------------------------------------


def intensity_of(ds: Dataset) -> Intensity:
    """Intensity meaning from Modality and (for MR) echo / repetition time.

    MR weighting is a heuristic on Repetition Time (0018,0080) and Echo Time (0018,0081):
    short TR and TE -> T1w, long TR and TE -> T2w, otherwise unspecified MR.
    """
    modality = str(ds.get("Modality", "")).upper()
    if modality == "CT":
        return Intensity.HU
    if modality == "MR":
        tr = _floats(ds.get("RepetitionTime"))
        te = _floats(ds.get("EchoTime"))
        if tr is None or te is None:
            mr = _first(
                _first(ds, "SharedFunctionalGroupsSequence"), "MRTimingAndRelatedParametersSequence"
            )
            tr = tr or (_floats(mr.get("RepetitionTime")) if mr else None)
            mr_echo = _first(_first(ds, "SharedFunctionalGroupsSequence"), "MREchoSequence")
            te = te or (_floats(mr_echo.get("EffectiveEchoTime")) if mr_echo else None)
        if tr and te:
            if tr[0] < 1000 and te[0] < 30:
                return Intensity.MR_T1W
            if tr[0] >= 2000 and te[0] >= 70:
                return Intensity.MR_T2W
        return Intensity.MR
    return Intensity.MR if modality.startswith("M") else Intensity.HU


@dataclass(frozen=True)
class StoredPixels:
    """Integer pixel data and the Modality LUT that maps it back to physical values."""

    array: np.ndarray  # uint16 (z, y, x)
    slope: float
    intercept: float
    bits_stored: int = 16
    signed: bool = False

    def to_physical(self) -> np.ndarray:
        return self.array.astype(np.float32) * np.float32(self.slope) + np.float32(self.intercept)


def to_stored(data: np.ndarray, intensity: Intensity | str, *, levels: int = 4096) -> StoredPixels:
    """Map physical values to unsigned 16-bit stored values with Rescale Slope / Intercept.

    CT (HU) keeps slope 1 and intercept -1024 (or lower if the data go below -1024), so a
    stored value is an exact HU and round trips are lossless up to rounding. Other
    intensities are scaled linearly so that the data span ``levels`` stored values (12 bits
    by default) with intercept at the minimum (clamped to <= 0).

    Raises
    ------
    ValueError
        if ``data`` contains NaN or infinity.
    """
    data = np.asarray(data, dtype=np.float64)
    if not np.all(np.isfinite(data)):
        raise ValueError("cannot store non-finite values (NaN / inf)")
    lo = float(data.min()) if data.size else 0.0
    hi = float(data.max()) if data.size else 0.0
    slope, intercept = stored_scale(lo, hi, intensity, levels=levels)
    stored = np.rint((data - intercept) / slope)
    stored = np.clip(stored, 0, 65535).astype(np.uint16)
    return StoredPixels(stored, slope, intercept)


def stored_scale(lo: float, hi: float, intensity: Intensity | str, *,
                 levels: int = 4096) -> tuple[float, float]:
    """(Rescale Slope, Rescale Intercept) that :func:`to_stored` uses for physical values in
    [lo, hi] (the watermark's HU bound converts to stored units with the slope)."""
    if Intensity(intensity) is Intensity.HU:
        intercept = float(min(-1024.0, math.floor(lo)))
        slope = 1.0
        span = hi - intercept
        if span > 65535:
            slope = float(math.ceil(span / 65535))
    else:
        intercept = float(min(0.0, math.floor(lo)))
        span = hi - intercept
        slope = span / (levels - 1) if span > 0 else 1.0
        # keep the decimal representation short (DS is at most 16 characters)
        slope = float(f"{slope:.8g}")
        if span / slope > 65535:
            slope = float(f"{span / 65535:.8g}") * 1.0000001
    return slope, intercept


# -- public API ------------------------------------------------------------------------------


def _reference(ds: Dataset) -> Dataset:
    ref = Dataset()
    for elem in ds:
        if elem.tag.group in (0x7FE0,) or elem.keyword in (
            "PerFrameFunctionalGroupsSequence",
            "SharedFunctionalGroupsSequence",
        ):
            continue
        ref.add(elem)
    if hasattr(ds, "file_meta"):
        ref.file_meta = ds.file_meta
    return ref


def _is_2d_mr(ds: Dataset) -> bool:
    return (str(ds.get("Modality", "")).upper() == "MR"
            and str(ds.get("MRAcquisitionType", "")).upper() == "2D")


def _assemble_stack(
    frames: Sequence[_Frame], datasets: Sequence[Dataset], intensity: Intensity,
    *, slice_runs: bool = False,
) -> AssembledVolume:
    _check_uniform(frames)
    dist = _distances(frames)
    order = np.argsort(dist, kind="stable")
    frames = [frames[i] for i in order]
    dist = dist[order]
    runs = _runs(dist)
    kept_runs: tuple[tuple[int, int], ...] = ()
    if len(runs) > 1 and _is_2d_mr(datasets[0]) and slice_runs:
        kept_runs = tuple((int(r.start), int(r.stop)) for r in runs)
        runs = [slice(0, len(frames))]
    if len(runs) > 1 and _is_2d_mr(datasets[0]):
        sizes = [r.stop - r.start for r in runs]
        raise VolumeError(
            Reason.MR_2D_NON_CONTIGUOUS,
            f"2D multi-slice MR (MR Acquisition Type 2D) with non-contiguous slice positions: "
            f"runs of {sizes} slices (nominal spacing {float(np.median(np.diff(dist))):.3f} "
            f"mm); its slices are not one volume, the series is not processed",
        )
    if len(runs) > 1:
        sizes = [r.stop - r.start for r in runs]
        raise VolumeError(
            Reason.SPACING_GAP,
            f"slice spacing is not uniform: runs of {sizes} slices "
            f"(nominal {float(np.median(np.diff(dist))):.3f} mm)",
        )
    first = frames[0]
    assert first.pixel_spacing is not None and first.orientation is not None
    if kept_runs:  # the spacing within the runs (the gaps between them are not spacing)
        steps = np.concatenate([np.diff(dist[a:b]) for a, b in kept_runs]) \
            if any(b - a > 1 for a, b in kept_runs) else np.array([])
        slice_spacing = (float(np.median(steps)) if steps.size
                         else float(first.thickness or 1.0))
    elif len(frames) > 1:
        slice_spacing = float(np.median(np.diff(dist)))
    else:
        slice_spacing = float(first.thickness or 1.0)
    data = np.stack(
        [
            f.stored.astype(np.float32) * np.float32(f.slope) + np.float32(f.intercept)
            for f in frames
        ]
    ).astype(np.float32)
    fov = None
    if any(f.padding is not None for f in frames):
        fov = ~np.stack([f.padding if f.padding is not None
                         else np.zeros((f.rows, f.columns), dtype=bool) for f in frames])
    head = datasets[0]
    slopes = {f.slope for f in frames}
    intercepts = {f.intercept for f in frames}
    geometry = Geometry(
        orientation=tuple(float(v) for v in first.orientation),  # type: ignore[arg-type]
        positions=tuple(f.position for f in frames),  # type: ignore[misc]
        pixel_spacing=first.pixel_spacing,
        slice_spacing=slice_spacing,
        slice_thickness=first.thickness,
        rows=first.rows,
        columns=first.columns,
        frame_of_reference_uid=first.frame_of_reference_uid,
        study_instance_uid=str(head.StudyInstanceUID),
        series_instance_uid=str(head.SeriesInstanceUID),
        modality=str(head.get("Modality", "OT")),
        sources=tuple(f.ref for f in frames),
        lossy=any(_is_lossy(ds) for ds in datasets),
        synthetic=any(is_synthetic(ds) for ds in datasets),
        rescale_slope=slopes.pop() if len(slopes) == 1 else 1.0,
        rescale_intercept=intercepts.pop() if len(intercepts) == 1 else 0.0,
    )
    volume = Volume(
        data=data,
        spacing=(slice_spacing, first.pixel_spacing[0], first.pixel_spacing[1]),
        intensity=intensity,
        fov=fov,
    )
    logger.debug(
        "assembled %d slices %dx%d spacing %s",
        len(frames),
        first.rows,
        first.columns,
        volume.spacing,
    )
    return AssembledVolume(volume, geometry, _reference(head), kept_runs)


def _all_frames(datasets: Sequence[Dataset]) -> list[_Frame]:
    if not datasets:
        raise VolumeError(Reason.EMPTY, "no instances")
    frames: list[_Frame] = []
    for ds in datasets:
        frames.extend(frames_of(ds))
    _check_geometry(frames)
    return frames


def assemble(datasets: Iterable[Dataset], *, intensity: Intensity | None = None,
             slice_runs: bool = False) -> AssembledVolume:
    """Assemble the instances of one series into one volume, or raise.

    Parameters
    ----------
    datasets
        pydicom datasets with pixel data (single-frame slices and/or multi-frame instances).
    intensity
        override of the intensity meaning (default: :func:`intensity_of` the first instance).
    slice_runs
        2D multi-slice MR with non-contiguous positions becomes one volume at the received
        positions with ``runs`` naming its evenly spaced parts (the caller processes each on
        its own) instead of raising ``mr_2d_non_contiguous``.

    Raises
    ------
    VolumeError
        with ``reason`` among :class:`Reason` when the instances are not one regular stack.
    """
    datasets = list(datasets)
    frames = _all_frames(datasets)
    return _assemble_stack(frames, datasets, intensity or intensity_of(datasets[0]),
                           slice_runs=slice_runs)


@dataclass(frozen=True)
class Rejected:
    """A part of a series that could not be assembled, and why."""

    sop_instance_uids: tuple[str, ...]
    reason: Reason
    message: str


def assemble_split(
    datasets: Iterable[Dataset], *, intensity: Intensity | None = None, min_slices: int = 1
) -> tuple[list[AssembledVolume], list[Rejected]]:
    """Split a possibly inconsistent series into regular stacks and assemble each.

    Frames are grouped by Frame of Reference, orientation, matrix size and pixel spacing;
    each group is sorted along its normal and cut at spacing gaps. Groups that cannot be
    assembled (missing geometry, duplicate positions, undecodable) come back in the second
    list with their reason; stacks shorter than ``min_slices`` too.
    """
    datasets = list(datasets)
    if not datasets:
        return [], [Rejected((), Reason.EMPTY, "no instances")]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    frames: list[_Frame] = []
    rejected: list[Rejected] = []
    for ds in datasets:
        try:
            fs = frames_of(ds)
            _check_geometry(fs)
        except VolumeError as exc:
            rejected.append(Rejected((str(ds.SOPInstanceUID),), exc.reason, str(exc)))
            continue
        frames.extend(fs)
    groups: dict[tuple[object, ...], list[_Frame]] = {}
    for f in frames:
        groups.setdefault(_stack_key(f), []).append(f)
    volumes: list[AssembledVolume] = []
    for group in groups.values():
        dist = _distances(group)
        order = np.argsort(dist, kind="stable")
        group = [group[i] for i in order]
        try:
            runs = _runs(dist[order])
        except VolumeError as exc:
            uids = tuple(dict.fromkeys(f.ref.sop_instance_uid for f in group))
            rejected.append(Rejected(uids, exc.reason, str(exc)))
            continue
        for run in runs:
            part = group[run]
            uids = tuple(dict.fromkeys(f.ref.sop_instance_uid for f in part))
            if len(part) < min_slices:
                rejected.append(
                    Rejected(
                        uids, Reason.SPACING_GAP, f"stack of {len(part)} < {min_slices} slices"
                    )
                )
                continue
            dsets = [by_uid[u] for u in uids]
            volumes.append(_assemble_stack(part, dsets, intensity or intensity_of(dsets[0])))
    return volumes, rejected
