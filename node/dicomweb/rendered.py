"""Rendered and thumbnail resources (PS3.18 10.4.1.1.3, 8.3.5.1): JPEG or PNG of one
frame, with ``window=center,width[,function]``, ``viewport=vw,vh`` and ``quality``
(JPEG). The default window is the object's first Window Center / Width, else the frame's
range. Study and series are rendered by their middle instance.
"""
from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut

from node.context import NodeContext
from node.dicomweb.auth import Problem
from node.dicomweb.media import parse_accept
from storage.query import InstanceRef

__all__ = ["RenderParams", "choose_image_type", "render"]

THUMBNAIL = (128, 128)


class RenderParams:
    def __init__(self, window: str | None, viewport: str | None, quality: str | None,
                 thumbnail: bool):
        self.center = self.width = None
        self.function = "LINEAR"
        if window:
            parts = [p.strip() for p in window.split(",")]
            try:
                self.center, self.width = float(parts[0]), float(parts[1])
            except (IndexError, ValueError):
                raise Problem(400, "Bad Request", "window=center,width[,function]") from None
            if self.width <= 0:
                raise Problem(400, "Bad Request", "window width must be positive")
            if len(parts) > 2 and parts[2]:
                self.function = parts[2].upper()
                if self.function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
                    raise Problem(400, "Bad Request", "window function: linear, "
                                  "linear-exact or sigmoid")
        self.viewport: tuple[int, int] | None = THUMBNAIL if thumbnail else None
        if viewport:
            try:
                vw, vh = (int(float(x)) for x in viewport.split(",")[:2])
            except ValueError:
                raise Problem(400, "Bad Request", "viewport=vw,vh") from None
            if vw < 1 or vh < 1:
                raise Problem(400, "Bad Request", "viewport sizes are positive")
            self.viewport = (vw, vh)
        self.quality = 90
        if quality:
            try:
                self.quality = int(quality)
            except ValueError:
                raise Problem(400, "Bad Request", "quality is 1..100") from None
            if not 1 <= self.quality <= 100:
                raise Problem(400, "Bad Request", "quality is 1..100")


def choose_image_type(accept: str | None) -> str:
    for r in parse_accept(accept):
        for mt in ("image/jpeg", "image/png"):
            if r.matches(mt):
                return mt
    raise Problem(406, "Not Acceptable", "rendered images are image/jpeg or image/png")


def _window(frame: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    x = frame.astype(np.float64)
    if function == "SIGMOID":
        y = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        y = (x - (center - width / 2)) / width
    elif width <= 1:  # PS3.3 C.11.2.1.2.1 with width 1: a threshold
        y = (x > center - 0.5).astype(np.float64)
    else:  # PS3.3 C.11.2.1.2.1
        y = ((x - (center - 0.5)) / (width - 1)) + 0.5
    return (np.clip(y, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _first(v: object) -> float | None:
    if isinstance(v, list | tuple | MultiValue):
        v = v[0] if len(v) else None
    if v is None:
        return None
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def render(ctx: NodeContext, r: InstanceRef, frame: int, params: RenderParams,
           media: str) -> bytes:
    ds = dcmread(ctx.store.path(r.file_path))
    if "PixelData" not in ds:
        raise Problem(404, "Not Found", "the instance has no pixel data")
    n = int(ds.get("NumberOfFrames") or 1)
    if not 1 <= frame <= n:
        raise Problem(404, "Not Found", f"the instance has {n} frame(s)")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise Problem(500, "Internal Server Error",
                      f"pixel data cannot be decoded: {type(exc).__name__}") from None
    spp = int(ds.get("SamplesPerPixel") or 1)
    if n > 1:
        arr = arr[frame - 1]
    if spp == 1:
        values = apply_modality_lut(arr, ds)
        center, width = params.center, params.width
        if center is None:
            center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
        if center is None or not width or width <= 0:
            lo, hi = float(np.min(values)), float(np.max(values))
            center, width = (lo + hi) / 2, max(hi - lo, 1.0)
        img8 = _window(values, center, width, params.function)
        if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
            img8 = 255 - img8
        img = Image.fromarray(img8, mode="L")
    else:
        a = arr.astype(np.float64)
        if arr.dtype.itemsize > 1:
            a = a * 255.0 / max(float(np.max(a)), 1.0)
        img = Image.fromarray(a.clip(0, 255).astype(np.uint8), mode="RGB")
    if params.viewport is not None:
        img.thumbnail(params.viewport, Image.Resampling.LANCZOS)
    out = BytesIO()
    if media == "image/png":
        img.save(out, format="PNG")
    else:
        img.save(out, format="JPEG", quality=params.quality)
    return out.getvalue()


def representative(refs: list[InstanceRef]) -> InstanceRef:
    """The middle instance of the first series (study / series rendered, thumbnail)."""
    first = refs[0].series_instance_uid
    series = [r for r in refs if r.series_instance_uid == first]
    return series[len(series) // 2]
