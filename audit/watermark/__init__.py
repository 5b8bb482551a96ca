"""Keyed invisible watermark for 12/16-bit medical images (application tier of governance).

A recognition aid, not evidence: the ledger carries the evidence; the payload of the mark
points to the ledger's ``output.created`` event (``watermark_payload``). Arrays only: the
DICOM handling lives in ``node/cli/watermark.py`` and the pipeline.

>>> key = WatermarkKey.generate(key_id=1)
>>> marked = embed(stored, key, make_payload(1, mark_id), bits_stored=12, signed=False)
>>> det = detect(rendering, [key])
"""
from __future__ import annotations

from audit.watermark.core import (
    DEFAULT_FPR,
    DEFAULT_SCALES,
    MARK_ID_BITS,
    PAYLOAD_BITS,
    Detection,
    VerifiedEmbedding,
    codeword,
    detect,
    embed,
    embed_verified,
    make_payload,
    noise_sigma,
    payload_hex,
    sample_frames,
    split_payload,
    suggest_max_delta,
    threshold_for,
    valid_limits,
)
from audit.watermark.format import (
    CURRENT_FORMAT,
    FORMAT_V1,
    FORMAT_V2,
    FORMATS,
    MarkFormat,
    format_for,
)
from audit.watermark.key import WatermarkKey

__all__ = [
    "CURRENT_FORMAT",
    "DEFAULT_FPR",
    "DEFAULT_SCALES",
    "FORMATS",
    "FORMAT_V1",
    "FORMAT_V2",
    "MARK_ID_BITS",
    "PAYLOAD_BITS",
    "Detection",
    "MarkFormat",
    "VerifiedEmbedding",
    "WatermarkKey",
    "codeword",
    "detect",
    "embed",
    "embed_verified",
    "format_for",
    "make_payload",
    "noise_sigma",
    "payload_hex",
    "sample_frames",
    "split_payload",
    "suggest_max_delta",
    "threshold_for",
    "valid_limits",
]
