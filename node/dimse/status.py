"""The one home of the DIMSE status codes synthnode sends.

Every status the node returns is named here with the part of the standard that defines
it; no other module writes a bare hex status literal. Service modules add their own
section (query/retrieve statuses: PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4; storage
commitment: PS3.4 J.3) next to the storage ones below.

The category of a code follows PS3.7 C.1 (success 0000, warning 0001 / Bxxx / 0107 /
0116, failure Axxx / Cxxx / 01xx / 02xx, cancel FE00, pending FF00 / FF01).
"""
from __future__ import annotations

from enum import Enum, IntEnum

from pydicom.dataset import Dataset

__all__ = [
    "Category",
    "Commitment",
    "CommitmentFailureReason",
    "General",
    "QueryRetrieve",
    "Storage",
    "category",
    "status_dataset",
]


class Category(str, Enum):
    """Status categories of PS3.7 C.1."""

    SUCCESS = "success"
    WARNING = "warning"
    FAILURE = "failure"
    CANCEL = "cancel"
    PENDING = "pending"


class General(IntEnum):
    """Statuses valid for every DIMSE service (general status codes, PS3.7 Annex C)."""

    SUCCESS = 0x0000  # PS3.7 C.1
    #: Failure (PS3.7 C.5): processing failure inside the SCP (e.g. index not writable)
    PROCESSING_FAILURE = 0x0110
    #: Failure (PS3.7 C.5; defined for N-CREATE): an object with this SOP Instance UID exists
    DUPLICATE_SOP_INSTANCE = 0x0111
    #: Failure (PS3.7 C.5): no SOP Instance with this UID
    NO_SUCH_SOP_INSTANCE = 0x0112
    #: Failure (PS3.7 C.5): refused, abstract syntax not accepted for this operation
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    #: Failure (PS3.7 C.5): refused, not authorized for this operation
    NOT_AUTHORIZED = 0x0124
    #: Failure (PS3.7 C.5): resource limitation (e.g. node shutting down)
    RESOURCE_LIMITATION = 0x0213
    #: Cancel (PS3.7 C.3): the operation was cancelled (C-FIND / C-GET / C-MOVE)
    CANCEL = 0xFE00


class Storage(IntEnum):
    """Storage Service Class C-STORE statuses (PS3.4 B.2.3, Table B.2-1)."""

    SUCCESS = 0x0000
    #: Refused: Out of Resources (A7xx). Disk full or below ``storage.min_free_bytes``.
    OUT_OF_RESOURCES = 0xA700
    #: Error: Data Set does not match SOP Class (A9xx). The data set contradicts its
    #: SOP Class (command vs. data set UIDs, or a Type 1 key of the IOD missing).
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Error: Cannot understand (Cxxx). The data set could not be parsed.
    CANNOT_UNDERSTAND = 0xC000
    #: Warning: Coercion of Data Elements (B000).
    COERCION_OF_DATA_ELEMENTS = 0xB000
    #: Warning: Elements Discarded (B006). Used for a duplicate SOP Instance UID with
    #: different content under ``duplicate_policy = "keep_first"``: the object that was
    #: sent is discarded and the stored copy is kept.
    ELEMENTS_DISCARDED = 0xB006
    #: Warning: Data Set does not match SOP Class (B007).
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007


class QueryRetrieve(IntEnum):
    """Query/Retrieve C-FIND / C-GET / C-MOVE statuses (PS3.4 C.4.1.1.4, C.4.2.1.5,
    C.4.3.1.4)."""

    #: Pending: a match / sub-operations continue (C.4.1.1.4, C.4.2.1.5)
    PENDING = 0xFF00
    #: Pending: a match, but one or more optional keys were not supported (C.4.1.1.4)
    PENDING_WARNING = 0xFF01
    #: Refused: Out of Resources (C-FIND A700)
    OUT_OF_RESOURCES = 0xA700
    #: Refused: Out of Resources, unable to perform sub-operations (C-GET/C-MOVE A702)
    UNABLE_TO_PERFORM_SUB_OPERATIONS = 0xA702
    #: Refused: Move Destination unknown (C-MOVE A801)
    MOVE_DESTINATION_UNKNOWN = 0xA801
    #: Error: Identifier does not match SOP Class (A900)
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Error: Unable to process (Cxxx)
    UNABLE_TO_PROCESS = 0xC000
    #: Warning: sub-operations complete, one or more failures or warnings (B000)
    SUB_OPERATIONS_WITH_FAILURES = 0xB000


class Commitment(IntEnum):
    """Storage Commitment Push Model (PS3.4 J.3): N-ACTION / N-EVENT-REPORT values."""

    #: Action Type ID: Request Storage Commitment (J.3.2.1)
    ACTION_REQUEST = 1
    #: Event Type ID: Storage Commitment Request Successful (J.3.3.1)
    EVENT_SUCCESS = 1
    #: Event Type ID: Storage Commitment Request Complete - Failures Exist (J.3.3.1)
    EVENT_FAILURES = 2
    #: N-ACTION status: unknown Action Type ID (PS3.7 C.5)
    NO_SUCH_ACTION = 0x0123
    #: N-ACTION status: a required argument is missing (PS3.7 C.5)
    MISSING_ATTRIBUTE = 0x0120
    #: N-ACTION status: argument value not valid (PS3.7 C.5)
    INVALID_ARGUMENT_VALUE = 0x0115


class CommitmentFailureReason(IntEnum):
    """Failure Reason (0008,1197) per referenced instance (PS3.4 J.3.3.1.1, PS3.3 C.12.1.1.6)."""

    PROCESSING_FAILURE = 0x0110
    NO_SUCH_OBJECT_INSTANCE = 0x0112
    RESOURCE_LIMITATION = 0x0213
    REFERENCED_SOP_CLASS_NOT_SUPPORTED = 0x0122
    CLASS_INSTANCE_CONFLICT = 0x0119
    DUPLICATE_TRANSACTION_UID = 0x0131


def category(code: int) -> Category:
    """Classify a status code (PS3.7 C.1).

    Parameters
    ----------
    code : int
        A DIMSE status value.

    Returns
    -------
    Category
    """
    if code == 0x0000:
        return Category.SUCCESS
    if code in (0xFF00, 0xFF01):
        return Category.PENDING
    if code == 0xFE00:
        return Category.CANCEL
    if code in (0x0001, 0x0107, 0x0116) or 0xB000 <= code <= 0xBFFF:
        return Category.WARNING
    return Category.FAILURE


def is_transient(code: int) -> bool:
    """Whether a failure status is worth another attempt later: the Refused: Out of Resources
    statuses A7xx (PS3.4 B.2.3 for C-STORE, C.4.x for query / retrieve), which a peer sends
    when it is full or busy. Every other failure is permanent for that instance.

    Parameters
    ----------
    code : int
        A DIMSE status value (also a STOW-RS Failure Reason, which uses the same codes).
    """
    return (int(code) & 0xFF00) == 0xA700


def status_dataset(code: int, comment: str | None = None) -> Dataset:
    """A status as the Dataset a pynetdicom handler returns.

    Parameters
    ----------
    code : int
        The status value (use the enums of this module).
    comment : str, optional
        Error Comment (0000,0902), LO: at most 64 characters (PS3.7 E.1); longer
        text is cut. Sent for warnings and failures only. Never put PHI here.

    Returns
    -------
    pydicom.dataset.Dataset
        With ``Status`` and, where given, ``ErrorComment``.
    """
    ds = Dataset()
    ds.Status = int(code)
    if comment and category(code) in (Category.WARNING, Category.FAILURE):
        # LO allows no backslash or control characters (PS3.5 6.2)
        text = "".join(c if c.isprintable() and c != "\\" else " " for c in comment)
        ds.ErrorComment = text[:64]
    return ds
