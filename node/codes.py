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

# -- fixed code strings -----------------------------------------------------------------

#: Conversion Type (0008,0064) for generated Secondary Capture images (PS3.3 C.8.6.1).
CONVERSION_TYPE_SYNTHETIC = "SYN"

#: Image Type (0008,0008) of every output: values 1 and 2 (PS3.3 C.7.6.1.1.2).
IMAGE_TYPE_DERIVED_SECONDARY: tuple[str, str] = ("DERIVED", "SECONDARY")

#: Synthetic Data (0008,001C) values (PS3.3 C.12.1).
SYNTHETIC_YES = "YES"
SYNTHETIC_NO = "NO"

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
