"""Media types of PS3.18 8.7: Accept / Content-Type parsing and multipart/related bodies
(RFC 2387) in both directions, streamed.
"""
from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field

__all__ = ["DICOM", "DICOM_JSON", "MediaRange", "MultipartReader", "boundary", "coalesce",
           "multipart_content_type", "multipart_part_header", "parse_accept",
           "parse_media_type"]

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET = "application/octet-stream"

_PARAM = re.compile(r';\s*([^=;\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,]*)')


@dataclass(frozen=True)
class MediaRange:
    """One media type or range with its parameters (names lower-cased, quotes removed)."""

    type: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    def matches(self, media_type: str) -> bool:
        if self.type in ("*/*", media_type):
            return True
        major = media_type.split("/")[0]
        return self.type == f"{major}/*"


def _split_top(value: str) -> list[str]:
    """Split on commas outside quotes."""
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]


def parse_media_type(value: str) -> MediaRange:
    """``multipart/related; type="application/dicom"; boundary=xyz`` -> MediaRange."""
    head, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for m in _PARAM.finditer(";" + rest):
        v = m.group(2).strip()
        if len(v) >= 2 and v[0] == v[-1] == '"':
            v = v[1:-1].replace('\\"', '"')
        params[m.group(1).lower()] = v
    q = 1.0
    if "q" in params:
        try:
            q = float(params.pop("q"))
        except ValueError:
            q = 0.0
    return MediaRange(head.strip().lower(), params, q)


def parse_accept(value: str | None) -> list[MediaRange]:
    """The Accept header's ranges by preference (missing header: ``*/*``)."""
    if not value or not value.strip():
        return [MediaRange("*/*")]
    ranges = [parse_media_type(p) for p in _split_top(value)]
    ranges = [r for r in ranges if r.q > 0]
    return sorted(ranges, key=lambda r: -r.q)  # stable: equal q keep their order


def boundary() -> str:
    return uuid.uuid4().hex


def multipart_content_type(part_type: str, bnd: str, transfer_syntax: str | None = None) -> str:
    ct = f'multipart/related; type="{part_type}"; boundary={bnd}'
    if transfer_syntax:
        ct += f"; transfer-syntax={transfer_syntax}"
    return ct


def multipart_part_header(bnd: str, content_type: str, location: str | None = None) -> bytes:
    head = f"\r\n--{bnd}\r\nContent-Type: {content_type}\r\n"
    if location:
        head += f"Content-Location: {location}\r\n"
    return (head + "\r\n").encode("latin-1")


def multipart_end(bnd: str) -> bytes:
    return f"\r\n--{bnd}--\r\n".encode("latin-1")


def multipart_body(bnd: str, parts: Iterable[tuple[str, Iterable[bytes]]]) -> Iterator[bytes]:
    """Yield a multipart body: ``parts`` are (content type, chunks)."""
    for ct, chunks in parts:
        yield multipart_part_header(bnd, ct)
        yield from chunks
    yield multipart_end(bnd)


def coalesce(chunks: Iterable[bytes], size: int = 1 << 16) -> Iterator[bytes]:
    """Join small pieces into writes of at least ``size`` bytes (fewer sends, fewer
    thread hops per response); the last write carries the rest."""
    buf: list[bytes] = []
    n = 0
    for c in chunks:
        if len(c) >= size and not buf:
            yield c
            continue
        buf.append(c)
        n += len(c)
        if n >= size:
            yield b"".join(buf)
            buf, n = [], 0
    if buf:
        yield b"".join(buf)


class MultipartError(ValueError):
    pass


@dataclass
class Part:
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


class MultipartReader:
    """Incremental multipart/related reader: feed chunks, get complete parts; at most one
    part (plus one chunk) is held in memory."""

    def __init__(self, bnd: str):
        self.delim = b"\r\n--" + bnd.encode("latin-1")
        self._buf = bytearray(b"\r\n")  # so the first delimiter needs no special case
        self._started = False
        self._pos = 0  # where the next delimiter search starts
        self.done = False

    def feed(self, chunk: bytes) -> list[Part]:
        self._buf += chunk
        parts: list[Part] = []
        while not self.done:
            i = self._buf.find(self.delim, self._pos)
            if i < 0:
                self._pos = max(0, len(self._buf) - len(self.delim))
                break
            after = i + len(self.delim)
            if len(self._buf) < after + 2:
                break  # need to see whether this is the closing delimiter
            if self._started:
                parts.append(self._part(self._buf, i))
            tail = bytes(self._buf[after:after + 2])
            if tail == b"--":
                self.done = True
                self._buf.clear()
                break
            nl = self._buf.find(b"\r\n", after)
            if nl < 0:
                break
            del self._buf[:nl + 2]
            self._pos = 0
            self._started = True
        return parts

    def close(self) -> None:
        if not self.done:
            raise MultipartError("multipart body ends without its closing boundary")

    @staticmethod
    def _part(buf: bytearray, end: int) -> Part:
        """The part in ``buf[:end]``; its body copied once (a part is often megabytes)."""
        sep = buf.find(b"\r\n\r\n", 0, end)
        if sep < 0:
            if buf.startswith(b"\r\n"):  # part without headers
                with memoryview(buf) as view:
                    return Part({}, bytes(view[2:end]))
            raise MultipartError("multipart part without a header/body separator")
        headers: dict[str, str] = {}
        for line in buf[:sep].decode("latin-1").split("\r\n"):
            k, colon, v = line.partition(":")
            if colon:
                headers[k.strip().lower()] = v.strip()
        with memoryview(buf) as view:
            body = bytes(view[sep + 4:end])
        return Part(headers, body)


async def read_parts(stream: AsyncIterator[bytes], bnd: str, limit: int) -> AsyncIterator[Part]:
    """Parts of a streamed multipart body; raises :class:`MultipartError` on a malformed
    body and :class:`OverflowError` past ``limit`` bytes."""
    reader = MultipartReader(bnd)
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise OverflowError(total)
        for p in reader.feed(chunk):
            yield p
    reader.close()
