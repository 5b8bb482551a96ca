"""Structural check of a data set encoding (PS3.5 7.1 data elements, 7.5 nesting, A.4
encapsulation, A.5 deflate), run on every received object before anything is stored.

The walk reads only element headers and lengths, never values: it proves that the bytes
are a complete, well-formed encoding in the negotiated transfer syntax and returns the
offsets of the top-level elements so the caller can decode just the header it needs.
"""
from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPIPHTJ2KReferencedDeflate,
)

__all__ = ["PIXEL_TAGS", "Encoding", "EncodingError", "InflateLimitError", "check_encoding",
           "valid_uid"]

_DEFLATED = {DeflatedExplicitVRLittleEndian, JPIPHTJ2KReferencedDeflate}
# explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2, Table 7.1-1)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
#: every VR of PS3.5 Table 6.2-1; any other two letters are not an encoding we can read
_KNOWN_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO",
              b"LT", b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ",
              b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT",
              b"UV"}
_UNDEFINED = 0xFFFFFFFF
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_MAX_DEPTH = 64
#: Pixel Data, Float Pixel Data, Double Float Pixel Data (PS3.3 C.7.6.3)
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


class EncodingError(ValueError):
    """The data set is not a well-formed encoding in its transfer syntax."""


class InflateLimitError(EncodingError):
    """A deflated data set inflates to more than the caller allows."""


def valid_uid(value: str) -> bool:
    """A UID as PS3.5 9.1 defines it: at most 64 characters, dot-separated components of
    digits, no leading zero in a component (except the component "0")."""
    return len(value) <= 64 and _UID_RE.fullmatch(value) is not None



# -- encoding check ---------------------------------------------------------------------
def _walk(buf: memoryview, pos: int, end: int, implicit: bool, little: bool, depth: int,
          until_item_end: bool, top_tags: list[tuple[int, int]] | None) -> int:
    """Walk data elements from ``pos``; return the position after the last one (or after
    the item delimiter when ``until_item_end``). Raises EncodingError on any structural
    problem. PS3.5 7.1 (data element encoding), 7.5 (nesting of data sets)."""
    if depth > _MAX_DEPTH:
        raise EncodingError("sequences nested too deeply")
    u16 = "<H" if little else ">H"
    u32 = "<I" if little else ">I"
    last_tag = -1
    while pos < end:
        if pos + 8 > end:
            raise EncodingError(f"truncated element header at byte {pos}")
        group, elem = struct.unpack_from(u16, buf, pos)[0], struct.unpack_from(u16, buf, pos + 2)[0]
        tag = (group << 16) | elem
        if tag == _ITEM_END:
            if not until_item_end:
                raise EncodingError(f"unexpected item delimiter at byte {pos}")
            return pos + 8
        if group == 0xFFFE:
            raise EncodingError(f"unexpected item tag at byte {pos}")
        if top_tags is not None:
            if tag <= last_tag:
                raise EncodingError(f"data elements out of order at byte {pos} (PS3.5 7.1)")
            top_tags.append((tag, pos))
        last_tag = tag
        vr, length, pos = _vr_and_length(buf, pos, end, implicit, u16, u32)
        if length == _UNDEFINED:
            # sequence, UN-encoded sequence (implicit LE inside, PS3.5 6.2.2) or
            # encapsulated pixel data (PS3.5 A.4): items until the sequence delimiter
            inner_implicit = implicit or vr == b"UN"
            inner_little = little if vr != b"UN" else True
            pos = _walk_items(buf, pos, end, inner_implicit, inner_little, depth + 1,
                              fragments=tag in PIXEL_TAGS)
            continue
        if pos + length > end:
            raise EncodingError(
                f"value of ({group:04X},{elem:04X}) runs past the end: truncated data set")
        if vr == b"SQ" or (implicit and _is_sequence(tag)):
            _walk_items(buf, pos, pos + length, implicit, little, depth + 1, defined=True)
        pos += length
    if until_item_end:
        raise EncodingError("item without delimiter: truncated data set")
    return pos


def _vr_and_length(buf: memoryview, pos: int, end: int, implicit: bool, u16: str,
                   u32: str) -> tuple[bytes, int, int]:
    """VR (``b""`` when implicit) and value length of the element whose header starts at
    ``pos``, and the position of its value (PS3.5 7.1.1-7.1.3)."""
    if implicit:
        return b"", struct.unpack_from(u32, buf, pos + 4)[0], pos + 8
    vr = bytes(buf[pos + 4:pos + 6])
    if vr not in _KNOWN_VRS:
        raise EncodingError(f"unknown VR {vr!r} at byte {pos + 4} (PS3.5 6.2)")
    if vr in _LONG_VRS:
        if pos + 12 > end:
            raise EncodingError(f"truncated element header at byte {pos}")
        return vr, struct.unpack_from(u32, buf, pos + 8)[0], pos + 12
    return vr, struct.unpack_from(u16, buf, pos + 6)[0], pos + 8


def _is_sequence(tag: int) -> bool:
    """Whether the data dictionary gives ``tag`` the VR SQ (implicit VR, PS3.5 7.1.3)."""
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


def _walk_items(buf: memoryview, pos: int, end: int, implicit: bool, little: bool,
                depth: int, defined: bool = False, fragments: bool = False) -> int:
    """Walk the items of a sequence: up to its delimiter, or (``defined``) exactly up to
    ``end``, the end of its defined length (PS3.5 7.5.1). Each item's data set is walked
    too, unless the items are ``fragments`` of encapsulated pixel data (PS3.5 A.4)."""
    if depth > _MAX_DEPTH:
        raise EncodingError("sequences nested too deeply")
    u32 = "<I" if little else ">I"
    u16 = "<H" if little else ">H"
    while True:
        if defined and pos == end:
            return pos
        if pos + 8 > end:
            raise EncodingError("sequence without delimiter: truncated data set")
        group, elem = struct.unpack_from(u16, buf, pos)[0], struct.unpack_from(u16, buf, pos + 2)[0]
        tag = (group << 16) | elem
        length = struct.unpack_from(u32, buf, pos + 4)[0]
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise EncodingError(f"expected an item tag at byte {pos - 8}")
        if length == _UNDEFINED:
            pos = _walk(buf, pos, end, implicit, little, depth + 1, True, None)
        else:
            if pos + length > end:
                raise EncodingError("item runs past the end: truncated data set")
            if not fragments:
                _walk(buf, pos, pos + length, implicit, little, depth + 1, False, None)
            pos += length


@dataclass(frozen=True)
class Encoding:
    """Result of :func:`check_encoding`."""

    tags: dict[int, int]  # top-level tag -> byte offset of its element in ``plain``
    plain: bytes  # the encoding walked (inflated for deflated transfer syntaxes)
    implicit_vr: bool
    little_endian: bool

    def header_end(self) -> int:
        """Offset of the first top-level pixel data element (or the end): every index
        attribute lies before it."""
        offs = [o for t, o in self.tags.items() if t in PIXEL_TAGS]
        return min(offs) if offs else len(self.plain)


_INFLATE_STEP = 8 * 1024 * 1024


def _inflate(data: bytes, limit: int | None) -> bytes:
    """Raw deflate (RFC 1951) in bounded steps: memory never exceeds ``limit`` plus one
    step, however far the data would inflate."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    tail = data
    while True:
        out += d.decompress(tail, _INFLATE_STEP)
        if limit is not None and len(out) > limit:
            raise InflateLimitError(f"deflated data set inflates to more than {limit} bytes")
        tail = d.unconsumed_tail
        if not tail:
            break
    out += d.flush()
    if limit is not None and len(out) > limit:
        raise InflateLimitError(f"deflated data set inflates to more than {limit} bytes")
    return bytes(out)


def check_encoding(dataset: bytes, transfer_syntax: str, *,
                   max_inflated: int | None = None) -> Encoding:
    """Check that ``dataset`` is a complete, well-formed data set encoding.

    Parameters
    ----------
    dataset : bytes
        Data set bytes as sent (no file meta), in ``transfer_syntax``.
    transfer_syntax : str
        The negotiated transfer syntax UID.
    max_inflated : int, optional
        Refuse (:class:`InflateLimitError`) a deflated data set that inflates to more
        bytes; the inflation stops at the limit, so a deflate bomb costs no more memory.

    Returns
    -------
    Encoding
        Top-level tags with their offsets, and the walked (plain) encoding.

    Raises
    ------
    EncodingError
        Truncation, a broken header, an invalid VR, unterminated sequences, or top-level
        elements out of ascending tag order (PS3.5 7.1, 7.5; A.4 for encapsulation).
    """
    ts = UID(transfer_syntax)
    plain = dataset
    if ts in _DEFLATED:
        try:  # PS3.5 A.5: raw deflate (RFC 1951) of the explicit VR LE encoding
            plain = _inflate(dataset, max_inflated)
        except zlib.error as exc:
            raise EncodingError(f"deflated data set does not inflate: {exc}") from None
        implicit, little = False, True
    else:
        implicit = ts == ImplicitVRLittleEndian
        little = ts != ExplicitVRBigEndian
    if not plain:
        raise EncodingError("empty data set")
    tags: list[tuple[int, int]] = []
    _walk(memoryview(plain), 0, len(plain), implicit, little, 0, False, tags)
    return Encoding(dict(tags), plain, implicit, little)
