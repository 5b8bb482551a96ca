"""DICOM JSON (PS3.18 F.2) for index matches, and the query-parameter spelling of
attributes (keyword or 8 hex digits)."""
from __future__ import annotations

import functools
from typing import Any

from fastapi import Request
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from storage.matching import ATTRIBUTES

__all__ = ["attr_json", "base_url", "keyword_of", "match_json", "tag_hex"]

_NUMERIC = {"IS", "US", "UL", "SS", "SL", "DS", "FL", "FD", "SV", "UV"}


def keyword_of(name: str) -> str | None:
    """``PatientName`` or ``00100010`` -> ``PatientName``; None for an unknown name."""
    name = name.strip()
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        return keyword_for_tag(int(name, 16)) or None
    return name if tag_for_keyword(name) is not None else None


def tag_hex(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return f"{tag:08X}"


def _vr(keyword: str) -> str:
    a = ATTRIBUTES.get(keyword)
    if a is not None:
        return a.vr
    try:
        return str(dictionary_VR(keyword))
    except KeyError:
        return "UN"


@functools.lru_cache(maxsize=1024)
def _json_key(keyword: str) -> tuple[str, str] | None:
    """(8-hex tag, VR) of ``keyword``; None for a name that is not a DICOM keyword."""
    if tag_for_keyword(keyword) is None:
        return None
    return tag_hex(keyword), _vr(keyword)


def attr_json(keyword: str, value: Any, vr: str | None = None) -> dict[str, Any]:
    """One attribute as ``{"vr": ..., "Value": [...]}`` (no Value when empty)."""
    vr = vr or _vr(keyword)
    out: dict[str, Any] = {"vr": vr}
    if value is None or value == "" or value == []:
        return out
    values = value if isinstance(value, list) else [value]
    if vr == "PN":
        out["Value"] = [{"Alphabetic": str(v)} for v in values]
    elif vr in _NUMERIC:
        conv: list[Any] = []
        for v in values:
            try:
                conv.append(int(v) if vr != "DS" else float(v))
            except (TypeError, ValueError):
                conv.append(v)
        out["Value"] = conv
    else:
        out["Value"] = [str(v) for v in values]
    return out


def match_json(match: dict[str, Any]) -> dict[str, Any]:
    """An index match (keyword -> value) as a DICOM JSON object, tags in order."""
    obj = {}
    for kw, v in match.items():
        key = _json_key(kw)
        if key is not None:
            obj[key[0]] = attr_json(kw, v, key[1])
    return dict(sorted(obj.items()))


def base_url(request: Request) -> str:
    """The server's own URL as the client sees it (X-Forwarded-Proto / -Host honoured)."""
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip()
    host = request.headers.get("x-forwarded-host", "").split(",")[0].strip()
    proto = proto or request.url.scheme
    if not host:
        host = request.headers.get("host") or request.url.netloc
        server = request.scope.get("server")
        default = {"http": 80, "https": 443}.get(proto)
        if ":" not in host.rsplit("]", 1)[-1] and server and server[1] != default:
            host = f"{host}:{server[1]}"  # some clients send Host without the port
    root = request.scope.get("root_path", "") or ""
    return f"{proto}://{host}{root}".rstrip("/")
