"""Watermark check page: an uploaded PNG marked with the node's key is identified and its
payload resolved to the output.created ledger entry; an unmarked one is not."""
from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file

from tests.node.console.test_console import _login


def _png(a: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def marked_png(ctx: Any) -> tuple[bytes, bytes, int]:
    """(marked PNG, the same unmarked, payload) with the node's key; the payload's
    output.created entry is in the ledger, as the pipeline writes it."""
    from audit.events import Event, EventType
    from audit.watermark import WatermarkKey, embed, make_payload, payload_hex

    key_file = ctx.settings.watermark_key_file
    if not key_file.exists():
        WatermarkKey.generate(key_id=3).to_file(key_file)
    key = WatermarkKey.from_file(key_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ct = pydicom.dcmread(get_testdata_file("693_UNCR.dcm")).pixel_array.astype(int)
    soft = np.clip((ct - 1024 + 160) / 400 * 255, 0, 255).astype(np.uint8)
    payload = make_payload(key.key_id, 321)
    marked = embed(soft, key, payload, bits_stored=8, signed=False, max_delta=2)
    ctx.ledger.append(Event(type=EventType.OUTPUT_CREATED, actor="component:pipeline",
                            subject={"study_uid": "1.2.826.0.1.3680043.8.498.1",
                                     "series_uid": "1.2.826.0.1.3680043.8.498.2"},
                            payload={"watermark_payload": payload_hex(payload)}))
    return _png(marked), _png(soft), payload


def test_marked_png_is_identified_with_its_lineage(web: Any) -> None:
    from audit.watermark import payload_hex

    marked, soft, payload = marked_png(web.node.ctx)
    reader = _login(web, "reader")
    assert reader.get("/console/watermark").status_code == 403  # audit scope
    c = _login(web, "admin")
    r = c.post("/console/watermark", files={"file": ("out.png", marked, "image/png")})
    assert r.status_code == 200
    result = r.text.split('id="wm-result"', 1)[1].split("</p>", 1)[0]
    assert "MARKED" in result and payload_hex(payload) in result and "mark id 321" in result
    ledger = r.text.split('id="wm-ledger"', 1)[1].split("</p>", 1)[0]
    assert "1.2.826.0.1.3680043.8.498.2" in ledger and "lineage" in ledger
    plain = c.post("/console/watermark", files={"file": ("in.png", soft, "image/png")})
    assert "not marked" in plain.text.split('id="wm-result"', 1)[1].split("</p>", 1)[0]
    junk = c.post("/console/watermark", files={"file": ("x.png", b"not an image", "image/png")})
    assert "cannot read the image" in junk.text
