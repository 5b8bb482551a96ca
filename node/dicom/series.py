"""Output series builders: engine volume + source geometry -> tagged synthetic DICOM series.

One builder per :class:`node.dicom.codes.OutputFormat` (a small registry, :data:`BUILDERS`):

* ``sc``: one single-frame Secondary Capture Image per slice (highdicom ``SCImage``), with its
  wrong defaults overridden: Image Type DERIVED\\SECONDARY (not ...\\OTHER), Conversion Type
  SYN (not DI), no "highdicom" processing equipment item, no acquisition equipment copied
  from the source, Rescale Slope / Intercept / Type added (PS3.3 A.8.1, C.8.6.1, C.11.1).
* ``mf_word_sc``: one Multi-frame Grayscale Word SC Image (1.2.840.10008.5.1.4.1.1.7.3,
  PS3.3 A.8.4) built with pydicom ``Dataset.set_pixel_data``; geometry in the Multi-frame
  Functional Groups (Pixel Measures, Plane Orientation, Plane Position), no Overlay Plane.
* ``enhanced``: one Legacy Converted Enhanced CT / MR Image (PS3.3 A.70 / A.71) made by
  highdicom ``legacy`` from intermediate single-frame CT / MR objects that never leave
  this module.

Every output: same Study, new Series and SOP Instance UIDs, source Frame of Reference,
positions, orientation and spacing kept, physical values kept through Rescale Slope /
Intercept, Synthetic Data YES (PS3.3 C.12.1), a Contributing Equipment item with Purpose of
Reference (109100, DCM, "Synthesizing Equipment") naming model, version and weights digest,
Derivation Description with task, parameters, seed and ledger entry, a Source Image Sequence
with (121322, DCM) (+ (121330, DCM) for lossy sources), Series Description starting
"SYNTHETIC", Lossy Image Compression "01" propagated, Burned In Annotation NO and Recognizable
Visual Features set explicitly.

The watermark is applied to the stored integer volume before any encoding through the
``mark`` callable (``audit.watermark.embed`` bound to a key and payload by the caller).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import DS, DSdecimal, DSfloat

from engine.api import Intensity, Provenance, Volume
from node.dicom import codes
from node.dicom.codes import OutputFormat
from node.dicom.volume import AssembledVolume, Geometry, StoredPixels, to_stored
from storage.synthetic import SYNTHETIC_YES

logger = logging.getLogger(__name__)

#: A watermark embedder bound to key and payload: stored (z, y, x) uint16 -> same shape/dtype.
Mark = Callable[[np.ndarray], np.ndarray]

#: Transfer syntaxes an output may be written in: lossless only (the mark must survive).
ALLOWED_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {ExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless}
)

#: Body parts whose volumes are treated as having recognizable visual features.
HEAD_BODY_PARTS = frozenset({"HEAD", "BRAIN", "SKULL", "FACE", "HEADNECK", "NECK"})

#: Attributes copied from the source (Patient, General Study, Patient Study, Clinical Trial).
_COPIED = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "OtherPatientIDsSequence",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    "BodyPartExamined",
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
)

_ST_MAX = 1024  # ST value length (PS3.5 6.2)
_LO_MAX = 64  # LO value length


@dataclass(frozen=True)
class SeriesSpec:
    """What to build: format, output modality, numbering and provenance.

    Parameters
    ----------
    output_format
        one of :class:`node.dicom.codes.OutputFormat` (str accepted).
    provenance
        the engine's record (task, model id / version / weights digest, params, seed).
    ledger_entry
        id of the ledger entry of the job that produced the output (Derivation Description).
    series_number
        Series Number (0020,0011) of the new series.
    modality
        output modality ("CT" or "MR"); default from the output intensity.
    description
        text after the "SYNTHETIC" prefix of Series Description (default: task name).
    transfer_syntax_uid
        a lossless transfer syntax among :data:`ALLOWED_TRANSFER_SYNTAXES`.
    recognizable_visual_features
        None = from the source, else YES for head / neck body parts.
    derivation_codes
        Derivation Code Sequence items; default :func:`node.dicom.codes.derivation_codes_for_task`.
    series_instance_uid
        UID of the new series (default: generated); lets the caller derive the watermark
        payload from it before the pixels are built.
    uid_seed
        None = fresh SOP Instance UIDs; a text = SOP Instance UIDs (and the Series Instance
        UID when not given) derived from it and the instance's position: building the same
        output again gives the same UIDs, so a re-run never duplicates a series in PACS.
    """

    output_format: OutputFormat | str
    provenance: Provenance
    ledger_entry: str | None = None
    series_number: int = 9001
    modality: str | None = None
    description: str | None = None
    transfer_syntax_uid: str = ExplicitVRLittleEndian
    recognizable_visual_features: bool | None = None
    derivation_codes: tuple[codes.CodedConcept, ...] = field(default=())
    series_instance_uid: str | None = None
    uid_seed: str | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "output_format", OutputFormat(self.output_format))
        except ValueError:
            allowed = ", ".join(f.value for f in OutputFormat)
            raise ValueError(
                f"unknown output_format {self.output_format!r}; allowed: {allowed}"
            ) from None
        if self.transfer_syntax_uid not in ALLOWED_TRANSFER_SYNTAXES:
            raise ValueError(
                f"transfer syntax {self.transfer_syntax_uid} is not allowed for outputs; "
                f"use one of {sorted(ALLOWED_TRANSFER_SYNTAXES)} (lossless keeps the watermark)"
            )
        if self.modality is not None and self.modality not in ("CT", "MR"):
            raise ValueError(f"output modality must be CT or MR, got {self.modality!r}")
        if not 0 <= int(self.series_number) <= 2**31 - 1:
            raise ValueError("series_number must be a non-negative IS value")


@dataclass(frozen=True)
class BuiltSeries:
    """A built output series: the datasets (ready to save) and the marked stored pixels."""

    series_instance_uid: str
    sop_class_uid: str
    datasets: list[Dataset]
    stored: StoredPixels
    output_format: OutputFormat

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.datasets]


# -- helpers ----------------------------------------------------------------------------------


def _dsv(value: float) -> DSfloat | DSdecimal:
    ds = DS(value, auto_format=True)
    assert isinstance(ds, (DSfloat, DSdecimal))  # DS of a number (pydicom types it wider)
    return ds


def _now() -> datetime:
    return datetime.now(UTC).astimezone()


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _code_item(code: codes.CodedConcept) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _orientation_letters(vec: Sequence[float]) -> str:
    """Patient Orientation letter of a direction cosine (PS3.3 C.7.6.1.1.1), dominant axis."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    axis = int(np.argmax(np.abs(vec)))
    return letters[axis][0 if vec[axis] > 0 else 1]


def output_modality(volume: Volume, spec: SeriesSpec) -> str:
    if spec.modality:
        return spec.modality
    return "CT" if volume.intensity is Intensity.HU else "MR"


def derivation_description(provenance: Provenance, ledger_entry: str | None) -> str:
    """Derivation Description (0008,2111) text: task, model, parameters, seed, ledger entry."""
    params = json.dumps(provenance.parameters, sort_keys=True, separators=(",", ":"), default=str)
    head = (
        f"synthnode {provenance.task}; model {provenance.model_id} {provenance.model_version}"
        f" sha256:{provenance.weights_sha256}; seed {provenance.seed}; steps {provenance.steps}"
        f"; ledger {ledger_entry or 'none'}; params "
    )
    return _truncate(head + params, _ST_MAX)


def contributing_equipment_item(provenance: Provenance, when: datetime) -> Dataset:
    """Contributing Equipment Sequence item (0018,A001) for the generative model
    (PS3.3 C.12.1.1.7 / Table 10-5 "Contributing Equipment" with CID 7005 109100)."""
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = DicomSequence([_code_item(codes.SYNTHESIZING_EQUIPMENT)])
    item.Manufacturer = codes.MANUFACTURER
    item.ManufacturerModelName = _truncate(provenance.model_id, _LO_MAX)
    item.SoftwareVersions = [
        _truncate(provenance.model_version, _LO_MAX),
        _truncate(provenance.weights_sha256, _LO_MAX),
    ]
    item.DeviceSerialNumber = _truncate(provenance.weights_sha256, _LO_MAX)
    item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S.%f%z")
    item.ContributionDescription = _truncate(
        f"{provenance.task} by model {provenance.model_id} version {provenance.model_version}, "
        f"weights sha256:{provenance.weights_sha256}, device {provenance.device}",
        _ST_MAX,
    )
    return item


def source_image_item(ref_class: str, ref_uid: str, frame: int | None, lossy: bool) -> Dataset:
    """Source Image Sequence item (0008,2112) with Purpose of Reference 121322 (+121330)."""
    item = Dataset()
    item.ReferencedSOPClassUID = ref_class
    item.ReferencedSOPInstanceUID = ref_uid
    if frame is not None:
        item.ReferencedFrameNumber = frame
    purposes = [_code_item(codes.SOURCE_IMAGE_FOR_PROCESSING)]
    if lossy:
        purposes.append(_code_item(codes.LOSSY_COMPRESSED_PREDECESSOR))
    item.PurposeOfReferenceCodeSequence = DicomSequence(purposes)
    return item


def _window(physical: np.ndarray, slope: float) -> tuple[float, float]:
    """VOI window covering the 1st-99th percentile of the output (PS3.3 C.11.2)."""
    lo, hi = np.percentile(physical, [1.0, 99.0])
    width = max(float(hi - lo), 2.0 * slope)
    return float(lo + hi) / 2.0, width


def _recognizable(reference: Dataset, spec: SeriesSpec) -> str:
    if spec.recognizable_visual_features is not None:
        return "YES" if spec.recognizable_visual_features else "NO"
    src = str(reference.get("RecognizableVisualFeatures", "")).upper()
    if src in ("YES", "NO"):
        return src
    body = str(reference.get("BodyPartExamined", "")).upper().replace(" ", "")
    return "YES" if body in HEAD_BODY_PARTS else "NO"


class _Context:
    """Everything shared by the instances of one output series."""

    def __init__(
        self, source: AssembledVolume, output: Volume, spec: SeriesSpec, stored: StoredPixels
    ) -> None:
        self.source = source
        self.geometry: Geometry = source.geometry
        self.reference = source.reference
        self.output = output
        self.spec = spec
        self.stored = stored
        self.when = _now()
        self.series_uid = spec.series_instance_uid or self.uid("series")
        self.modality = output_modality(output, spec)
        self.intensity = output.intensity
        task = spec.description or spec.provenance.task
        src_desc = str(self.reference.get("SeriesDescription", "") or "")
        text = f"{codes.SERIES_DESCRIPTION_PREFIX} {task}"
        if src_desc:
            text += f" of {src_desc}"
        self.series_description = _truncate(text, _LO_MAX)
        self.window = _window(stored.to_physical(), stored.slope)
        self.lossy = self.geometry.lossy
        self.derivation_codes = spec.derivation_codes or codes.derivation_codes_for_task(
            spec.provenance.task
        )

    # -- attribute groups -----------------------------------------------------------------

    def uid(self, *parts: object) -> str:
        """A new UID: fresh, or derived from ``spec.uid_seed`` and ``parts``."""
        if self.spec.uid_seed is None:
            return str(generate_uid())
        return str(generate_uid(entropy_srcs=[self.spec.uid_seed, *map(str, parts)]))

    def patient_study(self, ds: Dataset) -> None:
        for kw in _COPIED:
            if kw in self.reference:
                ds[kw] = self.reference[kw]
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
            if kw not in ds:
                setattr(ds, kw, "")
        for kw in (
            "StudyDate",
            "StudyTime",
            "ReferringPhysicianName",
            "StudyID",
            "AccessionNumber",
        ):
            if kw not in ds:
                setattr(ds, kw, "")
        # Patient Identity Removed YES makes a method Type 1C (PS3.3 C.7.1.1); real
        # de-identified sources often omit it (pydicom's 693_UNCR.dcm): say where YES came from
        if (str(ds.get("PatientIdentityRemoved", "")).upper() == "YES"
                and "DeidentificationMethod" not in ds
                and "DeidentificationMethodCodeSequence" not in ds):
            ds.DeidentificationMethod = "as declared by the source series (method not given)"

    def series_equipment(self, ds: Dataset) -> None:
        ds.Modality = self.modality
        ds.SeriesInstanceUID = self.series_uid
        ds.SeriesNumber = self.spec.series_number
        ds.SeriesDescription = self.series_description
        ds.SeriesDate = self.when.strftime("%Y%m%d")
        ds.SeriesTime = self.when.strftime("%H%M%S")
        self.laterality(ds)
        # General Equipment: the equipment that made THIS instance is synthnode
        ds.Manufacturer = codes.MANUFACTURER
        ds.ManufacturerModelName = _truncate(self.spec.provenance.model_id, _LO_MAX)
        ds.SoftwareVersions = _truncate(self.spec.provenance.model_version, _LO_MAX)
        for kw in (
            "InstitutionName",
            "InstitutionAddress",
            "StationName",
            "DeviceSerialNumber",
            "InstitutionalDepartmentName",
        ):
            if kw in ds:
                del ds[kw]

    def laterality(self, ds: Dataset) -> None:
        """Laterality (0020,0060) is 2C, "required if the body part is a paired structure":
        keep the source's, or send it empty when the body part is unknown."""
        if "Laterality" in self.reference:
            ds.Laterality = self.reference.Laterality
        elif not self.reference.get("BodyPartExamined"):
            ds.Laterality = ""

    def source_evidence(self, ds: Dataset) -> None:
        """Source Image Evidence Sequence (0008,9154), Hierarchical SOP Instance Reference
        Macro (PS3.3 C.12.2, Table C.17-3) listing every source instance."""
        study = Dataset()
        study.StudyInstanceUID = self.geometry.study_instance_uid
        series = Dataset()
        series.SeriesInstanceUID = self.geometry.series_instance_uid
        refs = []
        for uid, cls in dict.fromkeys(
            (s.sop_instance_uid, s.sop_class_uid) for s in self.geometry.sources
        ):
            item = Dataset()
            item.ReferencedSOPClassUID = cls
            item.ReferencedSOPInstanceUID = uid
            refs.append(item)
        series.ReferencedSOPSequence = DicomSequence(refs)
        study.ReferencedSeriesSequence = DicomSequence([series])
        ds.SourceImageEvidenceSequence = DicomSequence([study])

    def frame_of_reference(self, ds: Dataset) -> None:
        if self.geometry.frame_of_reference_uid:
            ds.FrameOfReferenceUID = self.geometry.frame_of_reference_uid
            ds.PositionReferenceIndicator = (
                self.reference.get("PositionReferenceIndicator", "") or ""
            )

    def synthetic_tags(self, ds: Dataset) -> None:
        ds.SyntheticData = SYNTHETIC_YES
        ds.ImageType = list(codes.IMAGE_TYPE_DERIVED_SECONDARY)
        ds.DerivationDescription = derivation_description(
            self.spec.provenance, self.spec.ledger_entry
        )
        ds.DerivationCodeSequence = DicomSequence([_code_item(c) for c in self.derivation_codes])
        ds.ContributingEquipmentSequence = DicomSequence(
            [contributing_equipment_item(self.spec.provenance, self.when)]
        )
        ds.BurnedInAnnotation = "NO"
        ds.RecognizableVisualFeatures = _recognizable(self.reference, self.spec)
        if self.lossy:
            ds.LossyImageCompression = codes.LOSSY_COMPRESSION_YES
        else:
            ds.LossyImageCompression = "00"
        ds.InstanceCreationDate = self.when.strftime("%Y%m%d")
        ds.InstanceCreationTime = self.when.strftime("%H%M%S")
        ds.ContentDate = self.when.strftime("%Y%m%d")
        ds.ContentTime = self.when.strftime("%H%M%S")

    def sources(self, ds: Dataset, indices: Sequence[int]) -> None:
        items = []
        for i in indices:
            ref = self.geometry.sources[i]
            items.append(
                source_image_item(
                    ref.sop_class_uid, ref.sop_instance_uid, ref.frame_number, self.lossy
                )
            )
        ds.SourceImageSequence = DicomSequence(items)

    def modality_lut(self, ds: Dataset) -> None:
        ds.RescaleIntercept = _dsv(self.stored.intercept)
        ds.RescaleSlope = _dsv(self.stored.slope)
        ds.RescaleType = (
            codes.RESCALE_TYPE_HU
            if self.intensity is Intensity.HU
            else codes.RESCALE_TYPE_UNSPECIFIED
        )

    def voi(self, ds: Dataset) -> None:
        center, width = self.window
        ds.WindowCenter = _dsv(float(f"{center:.6g}"))
        ds.WindowWidth = _dsv(float(f"{width:.6g}"))
        if width < 1.0:  # LINEAR requires a width >= 1 (PS3.3 C.11.2.1.2.1)
            ds.VOILUTFunction = "LINEAR_EXACT"

    def plane(self, ds: Dataset, k: int) -> None:
        g = self.geometry
        ds.ImagePositionPatient = [_dsv(v) for v in g.positions[k]]
        ds.ImageOrientationPatient = [_dsv(v) for v in g.orientation]
        ds.PixelSpacing = [_dsv(v) for v in g.pixel_spacing]
        ds.SliceThickness = _dsv(g.slice_thickness or g.slice_spacing)

    def patient_orientation(self) -> tuple[str, str]:
        o = self.geometry.orientation
        return _orientation_letters(o[:3]), _orientation_letters(o[3:])

    def file_meta(self, ds: Dataset, transfer_syntax: str) -> None:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = UID(transfer_syntax)
        ds.file_meta = meta


# -- builders -----------------------------------------------------------------------------------


def padding_values(source: AssembledVolume, stored: StoredPixels) -> tuple[int, int | None] | None:
    """The output's Pixel Padding Value and Range Limit (stored values, PS3.3 C.7.5.1.1.2), or
    None.

    Only where the source declares Pixel Padding Value: its padding pixels (``fov`` False) keep
    their physical values through the engine (the quality gate holds an output that changed
    them), so in the output they are the stored values found there. One value gives Pixel
    Padding Value alone; several (a source padding range, or a rescale that spreads it) give
    the range lowest..highest (MONOCHROME2: Pixel Padding Value is the lower end). None, with
    a log line, where a field-of-view pixel of the output falls on a padding value: writing it
    would declare real image pixels padding.
    """
    if "PixelPaddingValue" not in source.reference:
        return None
    fov = source.volume.fov
    if fov is None or bool(fov.all()):
        return None
    pad = stored.array[~fov]
    lo, hi = int(pad.min()), int(pad.max())
    inside = stored.array[fov]
    clash = int(((inside >= lo) & (inside <= hi)).sum())
    if clash:
        logger.warning("output keeps the source's padding pixels but %d field-of-view pixel(s) "
                       "fall on its padding values [%d, %d]: Pixel Padding Value not written",
                       clash, lo, hi)
        return None
    return lo, (None if lo == hi else hi)


def _add_padding(ds: Dataset, padding: tuple[int, int | None]) -> None:
    # unsigned stored values (Pixel Representation 0): US, in the Image Pixel / General
    # Equipment modules every output IOD includes
    ds.add_new(0x00280120, "US", padding[0])  # Pixel Padding Value
    if padding[1] is not None:
        ds.add_new(0x00280121, "US", padding[1])  # Pixel Padding Range Limit


def _build_sc(ctx: _Context) -> list[Dataset]:
    from highdicom.sc import SCImage

    out = []
    po = ctx.patient_orientation()
    ref = ctx.reference
    for k in range(ctx.stored.array.shape[0]):
        sc = SCImage(
            pixel_array=np.ascontiguousarray(ctx.stored.array[k]),
            photometric_interpretation="MONOCHROME2",
            bits_allocated=16,
            coordinate_system="PATIENT",
            study_instance_uid=str(ref.StudyInstanceUID),
            series_instance_uid=ctx.series_uid,
            series_number=ctx.spec.series_number,
            sop_instance_uid=ctx.uid("sop", k),
            instance_number=k + 1,
            manufacturer=codes.MANUFACTURER,
            patient_orientation=po,
            pixel_spacing=ctx.geometry.pixel_spacing,
            transfer_syntax_uid=ctx.spec.transfer_syntax_uid,
        )
        ds = Dataset(sc)
        ds.file_meta = sc.file_meta
        # highdicom defaults that are wrong for a synthetic output
        for kw in (
            "ContributingEquipmentSequence",
            "DateOfSecondaryCapture",
            "TimeOfSecondaryCapture",
        ):
            if kw in ds:
                del ds[kw]
        ctx.patient_study(ds)
        ctx.series_equipment(ds)
        ctx.frame_of_reference(ds)
        ctx.synthetic_tags(ds)
        ds.ConversionType = codes.CONVERSION_TYPE_SYNTHETIC
        ds.SecondaryCaptureDeviceManufacturer = codes.MANUFACTURER
        ds.SecondaryCaptureDeviceManufacturerModelName = _truncate(
            ctx.spec.provenance.model_id, _LO_MAX
        )
        ds.SecondaryCaptureDeviceSoftwareVersions = _truncate(
            ctx.spec.provenance.model_version, _LO_MAX
        )
        ds.DateOfSecondaryCapture = ctx.when.strftime("%Y%m%d")
        ds.TimeOfSecondaryCapture = ctx.when.strftime("%H%M%S")
        ctx.sources(ds, [k])
        ctx.plane(ds, k)
        ctx.modality_lut(ds)
        ctx.voi(ds)
        ds.InstanceNumber = k + 1
        out.append(ds)
    return out


def _functional_groups(ctx: _Context, ds: Dataset) -> None:
    g = ctx.geometry
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [_dsv(v) for v in g.pixel_spacing]
    pm.SliceThickness = _dsv(g.slice_thickness or g.slice_spacing)
    if not ctx.source.runs:  # non-contiguous 2D slices: no single spacing between them
        pm.SpacingBetweenSlices = _dsv(g.slice_spacing)
    shared.PixelMeasuresSequence = DicomSequence([pm])
    po = Dataset()
    po.ImageOrientationPatient = [_dsv(v) for v in g.orientation]
    shared.PlaneOrientationSequence = DicomSequence([po])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per = []
    for k in range(len(g.positions)):
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [_dsv(v) for v in g.positions[k]]
        item.PlanePositionSequence = DicomSequence([pp])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per)


def _build_mf_word_sc(ctx: _Context) -> list[Dataset]:
    ds = Dataset()
    ds.SOPClassUID = codes.MULTIFRAME_GRAYSCALE_WORD_SC_IMAGE_STORAGE
    ds.SOPInstanceUID = ctx.uid("sop", 0)
    ctx.patient_study(ds)
    ctx.series_equipment(ds)
    ctx.frame_of_reference(ds)
    ctx.synthetic_tags(ds)
    ds.ConversionType = codes.CONVERSION_TYPE_SYNTHETIC
    ds.SecondaryCaptureDeviceManufacturer = codes.MANUFACTURER
    ds.SecondaryCaptureDeviceManufacturerModelName = _truncate(
        ctx.spec.provenance.model_id, _LO_MAX
    )
    ds.SecondaryCaptureDeviceSoftwareVersions = _truncate(
        ctx.spec.provenance.model_version, _LO_MAX
    )
    ds.DateOfSecondaryCapture = ctx.when.strftime("%Y%m%d")
    ds.TimeOfSecondaryCapture = ctx.when.strftime("%H%M%S")
    ds.InstanceNumber = 1
    po = ctx.patient_orientation()
    ds.PatientOrientation = [po[0], po[1]]
    ctx.sources(ds, range(len(ctx.geometry.sources)))
    ctx.modality_lut(ds)
    ctx.voi(ds)
    ds.PresentationLUTShape = "IDENTITY"
    # SC Multi-frame Vector Module: slice location per frame along the normal
    normal = ctx.geometry.normal
    locations = [float(np.dot(normal, p)) for p in ctx.geometry.positions]
    if len(locations) > 1:  # 1C: only when Number of Frames > 1 (PS3.3 C.7.6.6, C.8.6.4)
        ds.SliceLocationVector = [round(v, 4) for v in locations]
        ds.FrameIncrementPointer = 0x00182005  # Slice Location Vector
    _functional_groups(ctx, ds)
    ds.set_pixel_data(ctx.stored.array, "MONOCHROME2", 16)
    ds.NumberOfFrames = ctx.stored.array.shape[0]
    ctx.file_meta(ds, ExplicitVRLittleEndian)
    if ctx.spec.transfer_syntax_uid != ExplicitVRLittleEndian:
        ds.compress(ctx.spec.transfer_syntax_uid)
    return [ds]


def _legacy_slices(ctx: _Context) -> list[Dataset]:
    """Intermediate single-frame CT / MR objects fed to highdicom's legacy converter."""
    sop_class = codes.LEGACY_SOP_CLASS_BY_MODALITY[ctx.modality]
    out = []
    for k in range(ctx.stored.array.shape[0]):
        ds = Dataset()
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = ctx.uid("legacy", k)
        ctx.patient_study(ds)
        ctx.series_equipment(ds)
        ctx.frame_of_reference(ds)
        ctx.synthetic_tags(ds)
        ds.ImageType = list(codes.IMAGE_TYPE_DERIVED_SECONDARY)
        ds.InstanceNumber = k + 1
        ctx.sources(ds, [k])
        ctx.plane(ds, k)
        ctx.modality_lut(ds)
        ctx.voi(ds)
        ds.PatientPosition = ctx.reference.get("PatientPosition", "") or ""
        if ctx.modality == "MR":
            ds.ScanningSequence = "RM"  # research mode: no acquisition took place
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.EchoTime = None
            ds.RepetitionTime = None
            ds.EchoTrainLength = None
        else:
            ds.KVP = None
            ds.AcquisitionNumber = None
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ctx.stored.array.shape[1:]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(ctx.stored.array[k]).tobytes()
        ctx.file_meta(ds, ExplicitVRLittleEndian)
        out.append(ds)
    return out


def _build_enhanced(ctx: _Context) -> list[Dataset]:
    from highdicom.legacy import LegacyConvertedEnhancedCTImage, LegacyConvertedEnhancedMRImage

    cls = LegacyConvertedEnhancedCTImage if ctx.modality == "CT" else LegacyConvertedEnhancedMRImage
    legacy = _legacy_slices(ctx)
    obj = cls(
        legacy_datasets=legacy,
        series_instance_uid=ctx.series_uid,
        series_number=ctx.spec.series_number,
        sop_instance_uid=ctx.uid("sop", 0),
        instance_number=1,
        transfer_syntax_uid=ctx.spec.transfer_syntax_uid,
    )
    ds = Dataset(obj)
    ds.file_meta = obj.file_meta
    # Top-level tags the converter does not carry over or sets its own way.
    ctx.synthetic_tags(ds)
    # Enhanced CT / MR Image Type value 2 is enumerated PRIMARY only (PS3.3 C.8.16.1);
    # "DERIVED" in value 1 plus Synthetic Data carry the derivation.
    ds.ImageType = list(codes.IMAGE_TYPE_ENHANCED_DERIVED)
    ds.Manufacturer = codes.MANUFACTURER
    ctx.sources(ds, range(len(ctx.geometry.sources)))
    # the intermediate objects are not referenced: they never existed outside this function
    for kw in ("ReferencedImageEvidenceSequence", "SourceImageEvidenceSequence"):
        if kw in ds:
            del ds[kw]
    _fix_functional_groups(ds, ctx)
    ctx.source_evidence(ds)
    ctx.laterality(ds)
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        # one item required by the Unassigned Per-Frame Converted Attributes Macro
        # (PS3.3 C.7.6.16.2.29); highdicom leaves it out when nothing varies (one frame)
        if not item.get("UnassignedPerFrameConvertedAttributesSequence"):
            unassigned = Dataset()
            unassigned.InstanceNumber = k + 1
            item.UnassignedPerFrameConvertedAttributesSequence = DicomSequence([unassigned])
    return [ds]


def _fix_functional_groups(ds: Dataset, ctx: _Context) -> None:
    """Drop references to the intermediate legacy objects (they are never stored) and
    complete the Derivation Image Macro items that carry the real source references
    (PS3.3 C.7.6.16.2.6: Derivation Code Sequence is Type 1)."""
    groups = list(ds.get("PerFrameFunctionalGroupsSequence", [])) + list(
        ds.get("SharedFunctionalGroupsSequence", [])
    )
    for item in groups:
        for kw in ("ConversionSourceAttributesSequence", "ReferencedImageSequence"):
            if kw in item:
                del item[kw]
        for deriv in item.get("DerivationImageSequence", []):
            deriv.DerivationCodeSequence = DicomSequence(
                [_code_item(c) for c in ctx.derivation_codes]
            )


BUILDERS: dict[OutputFormat, Callable[[_Context], list[Dataset]]] = {
    OutputFormat.SC: _build_sc,
    OutputFormat.MF_WORD_SC: _build_mf_word_sc,
    OutputFormat.ENHANCED: _build_enhanced,
}


def build_series(
    source: AssembledVolume,
    output: Volume,
    spec: SeriesSpec,
    *,
    mark: Mark | None = None,
) -> BuiltSeries:
    """Build one synthetic output series from an engine output volume.

    Parameters
    ----------
    source
        the assembled source (geometry, source references, header-only reference dataset).
    output
        one engine output volume on the same grid as the source.
    spec
        format, provenance and numbering.
    mark
        watermark embedder applied to the stored uint16 (z, y, x) volume before encoding;
        None leaves the pixels unmarked (dispatch refuses unmarked outputs).

    Raises
    ------
    ValueError
        if the output grid differs from the source, or ``mark`` changes shape or dtype.
    """
    g = source.geometry
    expected = (len(g.positions), g.rows, g.columns)
    if output.data.shape != expected:
        raise ValueError(f"output shape {output.data.shape} != source grid {expected}")
    stored = to_stored(output.data, output.intensity)
    if mark is not None:
        marked = mark(stored.array)
        if marked.shape != stored.array.shape or marked.dtype != stored.array.dtype:
            raise ValueError(
                f"mark changed the array: {stored.array.shape}/{stored.array.dtype} -> "
                f"{marked.shape}/{marked.dtype}"
            )
        stored = StoredPixels(
            np.ascontiguousarray(marked),
            stored.slope,
            stored.intercept,
            stored.bits_stored,
            stored.signed,
        )
    ctx = _Context(source, output, spec, stored)
    modality = ctx.modality
    if (
        spec.output_format is OutputFormat.ENHANCED
        and modality not in codes.ENHANCED_SOP_CLASS_BY_MODALITY
    ):
        raise ValueError(f"no enhanced form for modality {modality}")
    datasets = BUILDERS[OutputFormat(spec.output_format)](ctx)
    padding = padding_values(source, stored)
    for ds in datasets:
        if padding is not None:
            _add_padding(ds, padding)
        if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
            ctx.file_meta(ds, spec.transfer_syntax_uid)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    logger.info(
        "built %s output series: %d instance(s), %d frame(s)",
        OutputFormat(spec.output_format).value,
        len(datasets),
        stored.array.shape[0],
    )
    return BuiltSeries(
        series_instance_uid=ctx.series_uid,
        sop_class_uid=str(datasets[0].SOPClassUID),
        datasets=datasets,
        stored=stored,
        output_format=OutputFormat(spec.output_format),
    )
