"""Does the Pixel Data element fit the Image Pixel module and the transfer syntax?

Checked on the encoded bytes, before anything is decoded (PS3.3 C.7.6.3 Image Pixel
module, PS3.5 8.1.1 native pixel data, A.4 encapsulation, Annex G RLE; JPEG / JPEG 2000
codestream markers from ISO/IEC 10918-1 and 15444-1). Nothing here allocates the decoded
image: the declared size is computed from Rows x Columns x Samples x Bits x Frames and
compared with the caller's limits first.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

__all__ = ["ImagePixel", "PixelDataError", "check_pixel_data", "declared_bytes"]

_JPEG = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
         JPEGLSLossless, JPEGLSNearLossless}
_J2K = {JPEG2000Lossless, JPEG2000, JPEG2000MCLossless, JPEG2000MC, HTJ2KLossless,
        HTJ2KLosslessRPCL, HTJ2K}
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_ITEM, _SEQ_END = 0xFFFEE000, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_DEFLATED_FRAMES = "1.2.840.10008.1.2.8.1"  # Deflated Image Frame Compression (PS3.5 A.4.13)


class PixelDataError(ValueError):
    """Pixel data that does not fit its module or transfer syntax. ``kind`` is
    ``"too_large"``, ``"mismatch"`` (module vs. bytes) or ``"transfer_syntax"``."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ImagePixel:
    """The Image Pixel module attributes that fix the size of Pixel Data."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    frames: int
    photometric: str = ""

    def frame_bytes(self) -> int:
        """Bytes of one native frame (PS3.5 8.1.1; YBR_FULL_422 stores 2 values a pixel)."""
        values = self.rows * self.columns * self.samples_per_pixel
        if self.photometric == "YBR_FULL_422" and self.samples_per_pixel == 3:
            values = self.rows * self.columns * 2
        if self.bits_allocated == 1:
            return (values + 7) // 8
        return values * (self.bits_allocated // 8)


def declared_bytes(px: ImagePixel) -> int:
    """Decoded size of all frames (bit-packed frames are contiguous, PS3.5 8.1.1)."""
    if px.bits_allocated == 1:
        values = px.rows * px.columns * px.samples_per_pixel * px.frames
        return (values + 7) // 8
    return px.frame_bytes() * px.frames


def _fragments(value: bytes | memoryview, little: bool) -> tuple[bytes, list[tuple[bytes, int]]]:
    """Basic Offset Table and fragments (first 64 bytes, length) of an encapsulated Pixel
    Data value (the bytes after its header, up to and including the sequence delimiter),
    PS3.5 A.4. Nothing but the offset table and the fragments' heads is copied."""
    u32 = "<I" if little else ">I"
    u16 = "<H" if little else ">H"
    pos = 0
    items: list[tuple[bytes, int]] = []
    while True:
        if pos + 8 > len(value):
            raise PixelDataError("mismatch", "encapsulated pixel data without delimiter")
        tag = (struct.unpack_from(u16, value, pos)[0] << 16) | struct.unpack_from(
            u16, value, pos + 2)[0]
        length = struct.unpack_from(u32, value, pos + 4)[0]
        pos += 8
        if tag == _SEQ_END:
            break
        if tag != _ITEM or length == _UNDEFINED or pos + length > len(value):
            raise PixelDataError("mismatch", "broken item in encapsulated pixel data")
        keep = length if not items else min(length, 64)  # the offset table whole
        items.append((bytes(value[pos:pos + keep]), length))
        pos += length
    if not items:
        raise PixelDataError("mismatch", "encapsulated pixel data without offset table")
    return items[0][0], items[1:]


def _check_codestream(ts: UID, fragment: tuple[bytes, int], px: ImagePixel) -> None:
    """The first bytes of a frame must be what the transfer syntax says they are."""
    frame, length = fragment
    if ts in _JPEG and not frame.startswith(b"\xff\xd8"):
        raise PixelDataError("transfer_syntax", "frame is not a JPEG codestream (no SOI)")
    if ts in _J2K and not (frame.startswith(b"\xff\x4f\xff\x51")
                           or frame.startswith(_JP2_SIGNATURE)):
        raise PixelDataError("transfer_syntax", "frame is not a JPEG 2000 codestream")
    if ts == RLELossless:
        if length < 64 or len(frame) < 64:
            raise PixelDataError("transfer_syntax", "RLE frame shorter than its header")
        header = struct.unpack_from("<16I", frame, 0)
        n = header[0]
        expected = px.samples_per_pixel * max(1, px.bits_allocated // 8)
        if n != expected or header[1] != 64:
            raise PixelDataError(
                "transfer_syntax",
                f"RLE header has {n} segments, the pixel module needs {expected} (PS3.5 G.2)")
        offsets = header[1:1 + n]
        if list(offsets) != sorted(offsets) or offsets[-1] >= length:
            raise PixelDataError("transfer_syntax", "RLE segment offsets out of range")


def check_pixel_data(value: bytes | memoryview, *, encapsulated_length: bool, ts: str, native: bool,
                     little: bool, px: ImagePixel, max_frame_bytes: int,
                     max_total_bytes: int) -> None:
    """Check one top-level Pixel Data value against the module, the syntax and limits.

    Parameters
    ----------
    value : bytes
        The element's value: the native bytes, or (undefined length) the encapsulated
        items including the sequence delimiter.
    encapsulated_length : bool
        The element had an undefined length.
    native : bool
        The transfer syntax is a native (uncompressed) one.

    Raises
    ------
    PixelDataError
    """
    if min(px.rows, px.columns, px.samples_per_pixel, px.frames) < 1:
        raise PixelDataError("mismatch", "Rows, Columns, Samples or Frames below 1")
    if px.bits_allocated not in (1, 8, 16, 32, 64):
        raise PixelDataError("mismatch", f"Bits Allocated {px.bits_allocated} (PS3.5 8.1.1)")
    frame = px.frame_bytes()
    total = declared_bytes(px)
    if frame > max_frame_bytes or total > max_total_bytes:
        raise PixelDataError("too_large", f"declared image of {total} bytes over the limit")
    if native:
        if encapsulated_length:
            raise PixelDataError("transfer_syntax",
                                 "encapsulated pixel data in a native transfer syntax")
        # trailing padding shorter than a frame is cosmetic (pydicom and DCMTK ignore it);
        # fewer bytes, or a frame's worth more, is another image than the module declares
        if not total <= len(value) < total + max(frame, 2):
            raise PixelDataError(
                "mismatch",
                f"Pixel Data has {len(value)} bytes, the pixel module declares {total}")
        return
    if not encapsulated_length:
        raise PixelDataError("transfer_syntax",
                             "native pixel data in an encapsulated transfer syntax (PS3.5 A.4)")
    _check_encapsulated(value, UID(ts), little, px)


def _check_encapsulated(value: bytes | memoryview, uid: UID, little: bool, px: ImagePixel) -> None:
    """Offset table, fragments per frame and each frame's codestream marker (PS3.5 A.4)."""
    bot, frags = _fragments(value, little)
    if not frags:
        raise PixelDataError("mismatch", "encapsulated pixel data without fragments")
    if len(bot) % 4:
        raise PixelDataError("mismatch", "Basic Offset Table length not a multiple of 4")
    if uid.name.startswith(("MPEG", "HEVC")) or uid == _DEFLATED_FRAMES:
        return  # one stream for all frames (video) / no codestream marker to check
    if len(frags) < px.frames:
        raise PixelDataError(
            "mismatch", f"{px.frames} frames declared, {len(frags)} fragments (PS3.5 A.4)")
    if bot:
        offsets = struct.unpack(f"<{len(bot) // 4}I", bot)
        sizes = [n + 8 for _, n in frags]
        starts, pos = {}, 0
        for i, s in enumerate(sizes):
            starts[pos] = i
            pos += s
        if len(offsets) != px.frames or any(o not in starts for o in offsets):
            raise PixelDataError("mismatch",
                                 "Basic Offset Table does not point at the frames' fragments")
        first = [frags[starts[o]] for o in offsets]
    elif len(frags) == px.frames:
        first = frags
    else:
        first = frags[:1]
    for f in first:
        _check_codestream(uid, f, px)
