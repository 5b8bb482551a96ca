"""The one home of coded concepts, UIDs and fixed code strings used in synthnode outputs.

Nothing else in the node spells a code value, a coding scheme or an output SOP class UID:
builders, dispatch and tests import them from here (the habit of pynetdicom ``sop_class.py``
and pydicom ``uid.py``).

References
----------
PS3.16 CID 7005 "Contributing Equipment Purposes of Reference" (109100).
PS3.16 CID 7202 "Source Image Purposes of Reference" (121322, 121330).
PS3.16 CID 7203 "Image Derivation" (113087; there is no "generative synthesis" code).
PS3.3 C.8.6.1 "SC Equipment Module" (Conversion Type, defined term SYN "Synthetic Image").
PS3.3 C.12.1 "SOP Common Module" (Synthetic Data (0008,001C), YES / NO).
PS3.4 B.5 "Standard SOP Classes" (the storage SOP class UIDs below).
"""
from __future__ import annotations

from enum import Enum

from highdicom.sr.coding import CodedConcept
from pydicom.uid import UID

# -- coded concepts ---------------------------------------------------------------------

#: Purpose of Reference of the Contributing Equipment item for the generative model
#: (DCM 109100, CID 7005).
SYNTHESIZING_EQUIPMENT = CodedConcept("109100", "DCM", "Synthesizing Equipment")

#: Purpose of Reference of each Source Image Sequence item (DCM 121322, CID 7202).
SOURCE_IMAGE_FOR_PROCESSING = CodedConcept(
    "121322", "DCM", "Source image for image processing operation"
)

#: Additional Purpose of Reference when the source was lossy compressed (DCM 121330, CID 7202).
LOSSY_COMPRESSED_PREDECESSOR = CodedConcept("121330", "DCM", "Lossy compressed predecessor")

#: Nearest Derivation Code (CID 7203) for restoration / denoising (DCM 113087).
SMOOTHING = CodedConcept("113087", "DCM", "Smoothing")

#: Derivation Code for generative outputs that CID 7203 has no code for (CT->MR synthesis,
#: augmentation). Private coding scheme designators start with "99" (PS3.16 Section 8.2).
GENERATIVE_SYNTHESIS = CodedConcept("SYN001", "99SYNTHNODE", "Generative image synthesis")

#: Task name fragments that denote restoration (denoising): derivation code 113087 Smoothing.
RESTORATION_TASK_MARKERS = ("restor", "denois")


def derivation_codes_for_task(task: str) -> tuple[CodedConcept, ...]:
    """Derivation Code Sequence (0008,9215) items for an engine task."""
    name = task.lower()
    if any(m in name for m in RESTORATION_TASK_MARKERS):
        return (SMOOTHING,)
    return (GENERATIVE_SYNTHESIS,)


# -- fixed code strings -----------------------------------------------------------------

#: Conversion Type (0008,0064) for generated Secondary Capture images (PS3.3 C.8.6.1).
CONVERSION_TYPE_SYNTHETIC = "SYN"

#: Image Type (0008,0008) of every output: values 1 and 2 (PS3.3 C.7.6.1.1.2).
IMAGE_TYPE_DERIVED_SECONDARY: tuple[str, str] = ("DERIVED", "SECONDARY")

#: Image Type of enhanced (multi-frame functional group) outputs: value 2 is enumerated PRIMARY
#: for Enhanced / Legacy Converted Enhanced CT and MR (PS3.3 C.8.16.1), values 3-4 VOLUME\NONE.
IMAGE_TYPE_ENHANCED_DERIVED: tuple[str, str, str, str] = ("DERIVED", "PRIMARY", "VOLUME", "NONE")

#: Synthetic Data (0008,001C) values (PS3.3 C.12.1): their home and the predicate
#: ``is_synthetic`` are in storage.synthetic (the index needs them too)

#: Lossy Image Compression (0028,2110) "has been subjected to lossy compression"; never reset.
LOSSY_COMPRESSION_YES = "01"

#: Every output Series Description begins with this marker.
SERIES_DESCRIPTION_PREFIX = "SYNTHETIC"

#: Manufacturer written in Contributing Equipment for our synthesizing software.
MANUFACTURER = "synthnode"

#: Rescale Type (0028,1054) values (PS3.3 C.11.1.1.2): HU for CT, US (unspecified) otherwise.
RESCALE_TYPE_HU = "HU"
RESCALE_TYPE_UNSPECIFIED = "US"

# -- SOP classes ------------------------------------------------------------------------

SECONDARY_CAPTURE_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")
MULTIFRAME_GRAYSCALE_WORD_SC_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7.3")
CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.2")
MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.1")
LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.4")


#: Transfer syntaxes whose encoding is lossy (PS3.5 Section 8 / Annex A): a source received in
#: one of these is a "lossy compressed predecessor" (121330) even without (0028,2110).
LOSSY_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
        "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Lossy (Near-Lossless)
        "1.2.840.10008.1.2.4.91",  # JPEG 2000 (lossy allowed)
        "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 Multi-component (lossy allowed)
        "1.2.840.10008.1.2.4.100",  # MPEG2 Main Profile / Main Level
        "1.2.840.10008.1.2.4.101",  # MPEG2 Main Profile / High Level
        "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC/H.264 High Profile / Level 4.1
        "1.2.840.10008.1.2.4.103",  # MPEG-4 AVC/H.264 BD-compatible High Profile / Level 4.1
        "1.2.840.10008.1.2.4.104",  # MPEG-4 AVC/H.264 High Profile For 2D Video
        "1.2.840.10008.1.2.4.105",  # MPEG-4 AVC/H.264 High Profile For 3D Video
        "1.2.840.10008.1.2.4.106",  # MPEG-4 AVC/H.264 Stereo High Profile
        "1.2.840.10008.1.2.4.107",  # HEVC/H.265 Main Profile / Level 5.1
        "1.2.840.10008.1.2.4.108",  # HEVC/H.265 Main 10 Profile / Level 5.1
        "1.2.840.10008.1.2.4.111",  # JPEG XL JPEG Recompression (of a lossy JPEG)
        "1.2.840.10008.1.2.4.112",  # JPEG XL
        "1.2.840.10008.1.2.4.203",  # High-Throughput JPEG 2000 (lossy allowed)
    }
)


class OutputFormat(str, Enum):
    """Output series formats (the values of ``pipeline.rules[].tasks[].output_format``)."""

    SC = "sc"  # single-frame Secondary Capture, one instance per slice
    MF_WORD_SC = "mf_word_sc"  # one Multi-frame Grayscale Word SC instance
    ENHANCED = "enhanced"  # one Legacy Converted Enhanced CT / MR instance


#: SOP class written per output format (ENHANCED depends on the output modality).
OUTPUT_SOP_CLASSES: dict[OutputFormat, tuple[UID, ...]] = {
    OutputFormat.SC: (SECONDARY_CAPTURE_IMAGE_STORAGE,),
    OutputFormat.MF_WORD_SC: (MULTIFRAME_GRAYSCALE_WORD_SC_IMAGE_STORAGE,),
    OutputFormat.ENHANCED: (
        LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
        LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE,
    ),
}

#: Enhanced SOP class per output modality.
ENHANCED_SOP_CLASS_BY_MODALITY: dict[str, UID] = {
    "CT": LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
    "MR": LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE,
}

#: Legacy single-frame SOP class per modality (intermediate objects for the enhanced form).
LEGACY_SOP_CLASS_BY_MODALITY: dict[str, UID] = {
    "CT": CT_IMAGE_STORAGE,
    "MR": MR_IMAGE_STORAGE,
}

#: Multi-frame (enhanced) input SOP classes that volume assembly reads frame by frame.
ENHANCED_INPUT_SOP_CLASSES: frozenset[UID] = frozenset(
    {
        ENHANCED_CT_IMAGE_STORAGE,
        LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
        ENHANCED_MR_IMAGE_STORAGE,
        LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE,
        MULTIFRAME_GRAYSCALE_WORD_SC_IMAGE_STORAGE,
    }
)
