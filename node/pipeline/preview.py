"""Pictures an administrator needs to judge a held output: the middle slice of the input
and of the output the quality gate held, side by side with their difference.

A held output is never built into DICOM or stored, so when the gate holds one the pipeline
keeps the two middle slices (float32, physical intensity) in ``<data_dir>/held/<job>/<k>.npz``;
:func:`comparison_png` renders ``input | output | difference`` from them on request.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from engine.types import Volume

__all__ = ["comparison_png", "expire_held_slices", "forget_held_slices", "held_slices_path",
           "save_held_slices"]


def held_slices_path(held_dir: Path, job_id: str, index: int) -> Path:
    if not job_id.replace("-", "").isalnum():
        raise ValueError(f"not a job id: {job_id!r}")
    return held_dir / job_id / f"{int(index)}.npz"


def save_held_slices(held_dir: Path, job_id: str, index: int, source: Volume,
                     output: Volume) -> Path:
    """Keep the middle slices of ``source`` and ``output`` (each its own middle) with their
    intensity kinds; written to a temporary name and renamed, so a reader sees all or none."""
    path = held_slices_path(held_dir, job_id, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(
            f, input=source.data[source.data.shape[0] // 2].astype(np.float32),
            output=output.data[output.data.shape[0] // 2].astype(np.float32),
            input_intensity=np.array(source.intensity.value),
            output_intensity=np.array(output.intensity.value))
    os.replace(tmp, path)
    return path


def forget_held_slices(held_dir: Path, job_id: str) -> int:
    """Remove the kept slices of one job's held outputs (patient pixel data) once an
    administrator has decided on them; returns how many files were removed."""
    folder = held_slices_path(held_dir, job_id, 0).parent
    if not folder.is_dir():
        return 0
    removed = 0
    for f in folder.iterdir():
        f.unlink(missing_ok=True)
        removed += 1
    folder.rmdir()
    return removed


def expire_held_slices(held_dir: Path, cutoff: float) -> dict[str, int]:
    """Remove the kept slices of held outputs no one decided on, written before ``cutoff``
    (a POSIX time: the retention period, ``storage.retention_days``); returns ``{job id:
    files removed}``."""
    out: dict[str, int] = {}
    if not held_dir.is_dir():
        return out
    for folder in sorted(held_dir.iterdir()):
        files = [f for f in folder.iterdir() if f.is_file()] if folder.is_dir() else []
        if not files or max(f.stat().st_mtime for f in files) >= cutoff:
            continue
        out[folder.name] = forget_held_slices(held_dir, folder.name)
    return out


def _window(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((a - lo) / (hi - lo), 0.0, 1.0) * 255).astype(np.uint8)


def _auto(a: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(a, [1, 99])
    return _window(a, float(lo), float(hi))


def comparison_png(path: Path) -> bytes:
    """``input | output | difference`` as one 8-bit grey PNG. Input and output are each
    windowed to their own 1st-99th percentile; the difference (output - input in physical
    units when both are the same intensity kind, else of the two windowed images) is shown
    mid-grey at zero, windowed symmetrically to its 99th absolute percentile."""
    from PIL import Image

    with np.load(path) as z:
        src, out = z["input"], z["output"]
        same = str(z["input_intensity"]) == str(z["output_intensity"])
    a, b = _auto(src), _auto(out)
    if same and src.shape == out.shape:
        diff = out.astype(np.float64) - src.astype(np.float64)
    else:
        h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
        diff = b[:h, :w].astype(np.float64) - a[:h, :w].astype(np.float64)
    m = float(np.percentile(np.abs(diff), 99)) or 1.0
    d = _window(diff, -m, m)
    h = max(a.shape[0], b.shape[0], d.shape[0])
    panels = []
    for p in (a, b, d):
        pad = np.zeros((h, p.shape[1]), np.uint8)
        pad[:p.shape[0]] = p
        panels.append(pad)
        panels.append(np.full((h, 4), 255, np.uint8))  # a white bar between panels
    img = np.concatenate(panels[:-1], axis=1)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()
