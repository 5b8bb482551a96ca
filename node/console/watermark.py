"""The console's watermark check: an uploaded DICOM / PNG / JPEG is looked at with the
node's watermark keys (``watermark.key_file`` and ``extra_key_files``); a readable payload
is resolved to the ``output.created`` ledger entry of the synthetic series that carries it
(the same detection and description as ``synthnode watermark detect``)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from node.context import NodeContext

__all__ = ["check_upload"]

SUFFIXES = {".dcm", ".png", ".jpg", ".jpeg", ""}


def _keys(ctx: NodeContext) -> list[Any]:
    from audit.watermark import WatermarkKey

    s = ctx.settings
    keys = []
    for p in [s.watermark_key_file, *s.watermark.extra_key_files]:
        if Path(p).is_file():
            keys.append(WatermarkKey.from_file(p))
    return keys


def check_upload(ctx: NodeContext, filename: str, data: bytes) -> dict[str, Any]:
    """Detection result of one uploaded file (``error`` names why there is none)."""
    from audit.events import EventType
    from audit.watermark import detect
    from node.audit_views import LedgerIndex, describe_detection, read_pixels

    suffix = Path(filename or "").suffix.lower()
    if suffix not in SUFFIXES:
        return {"file": filename, "error": "upload a DICOM, PNG or JPEG file"}
    keys = _keys(ctx)
    if not keys:
        return {"file": filename, "error": "this node has no watermark key"}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"upload{suffix or '.dcm'}"
        path.write_bytes(data)
        try:
            det = detect(read_pixels(path), keys)
        except Exception as exc:  # unreadable upload: say so
            return {"file": filename, "error": f"cannot read the image: {exc}"[:200]}
    by_payload: dict[str, dict[str, Any]] = {}
    if det.payload is not None:
        for e in ctx.ledger.query(event_types=[EventType.OUTPUT_CREATED.value]):
            hexv = str(e.event.payload.get("watermark_payload", "")).lower()
            if hexv:
                by_payload[hexv] = {"seq": e.seq, "time": e.event.time.isoformat(),
                                    "subject": e.event.subject}
    row = describe_detection(Path(filename), det, LedgerIndex(by_payload))
    row["file"] = filename
    return row
