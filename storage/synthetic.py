"""The one predicate for "is this instance synthetic": Synthetic Data (0008,001C) = YES
(PS3.3 C.12.1, CS, enumerated values YES / NO).

Used by the index (study and series flags), routing rules, volume assembly, the pipeline's
loop guard and the dispatch policy. Values come as received (possibly padded, any case); a
pydicom data set or element value, a string, or None are accepted.
"""
from __future__ import annotations

__all__ = ["SYNTHETIC_NO", "SYNTHETIC_YES", "is_synthetic"]

SYNTHETIC_YES = "YES"
SYNTHETIC_NO = "NO"


def is_synthetic(value: object) -> bool:
    """True when ``value`` (a Synthetic Data value, or a data set holding one) says YES."""
    if value is not None and hasattr(value, "get") and not isinstance(value, str | bytes):
        value = value.get("SyntheticData")
    if value is None:
        return False
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip(" \x00").upper() == SYNTHETIC_YES
