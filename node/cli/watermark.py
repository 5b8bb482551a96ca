"""``synthnode watermark``: key generation, embedding and detection on DICOM and PNG / JPEG.

The mark itself is :mod:`audit.watermark` (arrays only); this module reads and writes pixel
data. DICOM: the stored values of Pixel Data (PS3.5 8.1) with Bits Stored (0028,0101) and
Pixel Representation (0028,0103); multi-frame objects are marked frame by frame with one
geometry and detected with all frames pooled. PNG / JPEG: 8-bit grey (RGB is averaged).

``detect`` resolves a decoded payload to the ledger's ``output.created`` event whose payload
``watermark_payload`` equals the 12-digit hex form (:func:`audit.watermark.payload_hex`).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import typer

from audit.watermark import (
    MARK_ID_BITS,
    Detection,
    WatermarkKey,
    detect,
    embed,
    make_payload,
    payload_hex,
    suggest_max_delta,
)
from node.audit_views import IMAGE_SUFFIXES, LedgerIndex, describe_detection, read_pixels
from node.cli.common import ConfigOption, console, err_console, fail, open_engine, settings_from

logger = logging.getLogger(__name__)

app = typer.Typer(no_args_is_help=True)

DICOM_SUFFIXES = {".dcm", ".dicom", ""}


def _iter_files(paths: list[Path]) -> list[tuple[Path, Path]]:
    """(file, name relative to the argument it came from) for files and directory trees."""
    out: list[tuple[Path, Path]] = []
    for p in paths:
        if p.is_dir():
            out.extend((f, f.relative_to(p)) for f in sorted(p.rglob("*"))
                       if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            out.append((p, Path(p.name)))
        else:
            fail(f"{p}: no such file or directory")
    return out


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _load_keys(settings: Any, extra: list[Path]) -> list[WatermarkKey]:
    paths = [settings.watermark_key_file, *settings.watermark.extra_key_files, *extra]
    keys: list[WatermarkKey] = []
    for p in paths:
        if Path(p).is_file():
            try:
                keys.append(WatermarkKey.from_file(p))
            except ValueError as exc:
                fail(str(exc))
    if not keys:
        fail(f"no watermark key found (looked at {', '.join(str(p) for p in paths)}); "
             "run `synthnode watermark keygen`")
    return keys


@app.command()
def keygen(
    key_id: int = typer.Option(
        0, "--key-id", min=0, max=255, help="public key id carried in payloads"
    ),
    out: Path | None = typer.Option(
        None, "--out", help="key file (default: the configured watermark key)"
    ),
    force: bool = typer.Option(False, "--force", help="overwrite an existing key file"),
    config: Path | None = ConfigOption,
) -> None:
    """Generate a secret watermark key (file mode 0600)."""
    path = out or settings_from(config).watermark_key_file
    if path.exists() and not force:
        fail(f"{path} exists (use --force to replace it; keep the old one as an extra key)")
    key = WatermarkKey.generate(key_id)
    key.to_file(path, overwrite=force)
    console.print(f"wrote key id {key_id} (fingerprint {key.fingerprint}) to {path}")


# ----------------------------------------------------------------------------- embed


def _embed_dicom(
    src: Path, dst: Path, key: WatermarkKey, payload: int, max_delta: int | None
) -> tuple[int, Path]:
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    ds = pydicom.dcmread(src)
    if "PixelData" not in ds:
        raise ValueError("no Pixel Data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError("only single-sample (grey) images are marked")
    arr = ds.pixel_array
    bits = int(ds.BitsStored)
    signed = int(ds.PixelRepresentation) == 1
    hu = ds.get("Modality") == "CT" and "RescaleSlope" in ds and float(ds.RescaleSlope) == 1.0
    delta = max_delta if max_delta is not None else suggest_max_delta(arr, hu_calibrated=hu)
    valid_range = None
    if "PixelPaddingValue" in ds:  # keep padding untouched: mark only values above it
        valid_range = (
            int(ds.PixelPaddingValue) + 1,
            (1 << bits) - 1 if not signed else (1 << (bits - 1)) - 1,
        )
    marked = embed(arr, key, payload, bits_stored=bits, signed=signed, max_delta=delta,
                   valid_range=valid_range)
    if "PixelPaddingValue" in ds:
        marked = np.where(arr <= int(ds.PixelPaddingValue), arr, marked).astype(arr.dtype)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    ds.set_pixel_data(marked, ds.PhotometricInterpretation, bits)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return delta, dst


def _embed_image(
    src: Path, dst: Path, key: WatermarkKey, payload: int, max_delta: int | None
) -> tuple[int, Path]:
    from PIL import Image

    img = np.asarray(Image.open(src).convert("L"))
    delta = max_delta if max_delta is not None else 2
    marked = embed(img, key, payload, bits_stored=8, signed=False, max_delta=delta)
    dst = dst.with_suffix(".png")  # never re-compress the mark lossily on write
    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(marked).save(dst)
    return delta, dst


@app.command("embed")
def embed_cmd(
    paths: list[Path] = typer.Argument(..., help="DICOM files, PNG / JPEG files or directories"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory (same relative names)",
                             rich_help_panel="Required"),
    mark_id: int | None = typer.Option(
        None, "--mark-id", min=0, max=(1 << MARK_ID_BITS) - 1,
        help=f"{MARK_ID_BITS}-bit mark id (payload = key id || mark id); this or --payload",
        rich_help_panel="Required: one of"),
    payload_hex_opt: str | None = typer.Option(
        None, "--payload", help="full 48-bit payload as hex; this or --mark-id",
        rich_help_panel="Required: one of"),
    max_delta: int | None = typer.Option(
        None,
        "--max-delta",
        min=1,
        max=64,
        help="largest change in stored units (default: 2 for CT, noise-relative otherwise)",
    ),
    key_file: Path | None = typer.Option(
        None, "--key", help="key file (default: the configured key)"
    ),
    force: bool = typer.Option(False, "--force", help="replace files that exist under --out"),
    config: Path | None = ConfigOption,
) -> None:
    """Embed the watermark into copies under --out, then read each copy back and detect
    the mark with the same key: a file is reported marked only when the detector finds the
    payload in it; a copy that cannot be verified is removed (exit 1)."""
    settings = settings_from(config)
    key = WatermarkKey.from_file(key_file or settings.watermark_key_file) if (
        key_file or settings.watermark_key_file.is_file()) else None
    if key is None:
        fail("no watermark key; run `synthnode watermark keygen`")
        return
    if (mark_id is None) == (payload_hex_opt is None):
        fail("give exactly one of --mark-id or --payload", 2)
    try:
        payload = (
            make_payload(key.key_id, mark_id)
            if mark_id is not None
            else int(str(payload_hex_opt), 16)
        )
        if not 0 <= payload < (1 << 48):
            raise ValueError("payload must fit in 48 bits")
    except ValueError as exc:
        fail(str(exc), 2)
        return
    files = [(f, out / rel, rel) for f, rel in _iter_files(paths)]
    exists = [str(d if not _is_image(f) else d.with_suffix(".png")) for f, d, _ in files
              if (d if not _is_image(f) else d.with_suffix(".png")).exists()]
    if exists and not force:
        fail(f"{len(exists)} output file(s) exist, e.g. {exists[0]}; use --force to replace them")
    failures = 0
    for f, dst, _rel in files:
        try:
            delta, written = (_embed_image if _is_image(f) else _embed_dicom)(
                f, dst, key, payload, max_delta
            )
        except Exception as exc:  # one bad file never stops a directory run
            failures += 1
            err_console.print(f"[red]{f}: not marked: {exc}[/red]", highlight=False)
            continue
        problem = _verify_written(written, key, payload)
        if problem:
            failures += 1
            written.unlink(missing_ok=True)
            err_console.print(f"[red]{f}: not marked: {problem}; the copy was removed[/red]",
                              highlight=False)
            continue
        console.print(f"{f}: marked and verified (payload {payload_hex(payload)}, max delta "
                      f"{delta}) -> {written}", highlight=False, soft_wrap=True)
    if failures:
        raise typer.Exit(1)


def _verify_written(path: Path, key: WatermarkKey, payload: int) -> str | None:
    """Why the written file does not carry ``payload`` detectably (None when it does)."""
    try:
        det = detect(read_pixels(path), [key])
    except Exception as exc:
        return f"cannot read the written file back ({exc})"
    if not det.marked:
        return (f"the detector does not find the mark in the written file (score "
                f"{det.score:.2f} < threshold {det.threshold:.2f}): the image is too small or "
                "too flat for this bound; a larger --max-delta or image may work")
    if det.payload != payload:
        return (f"the mark is present but its payload reads {det.payload_hex or 'damaged'}, "
                f"not {payload_hex(payload)}")
    return None


# ----------------------------------------------------------------------------- detect


def _ledger_index(settings: Any) -> LedgerIndex:
    """``watermark_payload`` hex -> {seq, time, subject} of ``output.created`` events."""
    try:
        from audit.events import EventType
        from audit.ledger import Ledger
        from node.db import make_engine, schema_problem

        url = settings.database_url
        problem = schema_problem(url)  # never creates a database
        if problem:
            return LedgerIndex({}, f"ledger not available ({problem})")
        engine = make_engine(url)
        try:
            entries = Ledger(engine).query(event_types=[EventType.OUTPUT_CREATED.value])
        finally:
            engine.dispose()
    except Exception as exc:  # no database / not migrated: report, still print the payload
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return LedgerIndex({}, f"ledger not available ({type(exc).__name__}: {first})")
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        ev = e.event
        hexv = str(ev.payload.get("watermark_payload", "")).lower()
        if hexv:
            out[hexv] = {"seq": e.seq, "time": ev.time.isoformat(), "subject": ev.subject}
    return LedgerIndex(out)


@app.command("detect")
def detect_cmd(
    paths: list[Path] = typer.Argument(..., help="DICOM files, PNG / JPEG files or directories"),
    key_files: list[Path] = typer.Option([], "--key", help="extra key files to try"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
    fail_unmarked: bool = typer.Option(
        False, "--fail-unmarked", help="exit 1 if any file is not marked"
    ),
    config: Path | None = ConfigOption,
) -> None:
    """Detect the watermark and resolve its payload to the ledger entry."""
    settings = settings_from(config)
    keys = _load_keys(settings, key_files)
    files = _iter_files(paths)
    rows: list[dict[str, Any]] = []
    dets: list[tuple[Path, Detection | None, str | None]] = []
    for f, _ in files:
        try:
            dets.append((f, detect(read_pixels(f), keys), None))
        except Exception as exc:
            dets.append((f, None, str(exc)))
    ledger = (
        _ledger_index(settings)
        if any(d and d.payload is not None for _, d, _ in dets)
        else LedgerIndex({})
    )
    any_unmarked = False
    for f, det, error in dets:
        if det is None:
            any_unmarked = True
            row = {"file": str(f), "error": error}
        else:
            row = describe_detection(f, det, ledger)
            any_unmarked |= not det.marked
        rows.append(row)
        if as_json:
            sys.stdout.write(json.dumps(row, default=str) + "\n")
            continue
        if "error" in row:
            console.print(f"{f}: [red]unreadable[/red] ({error})")
            continue
        verdict = "[green]MARKED[/green]" if row["marked"] else "not marked"
        line = f"{f}: {verdict} score {row['score']} (threshold {row['threshold']})"
        if row["marked"]:
            line += f" key {row['key_id']}"
        if row["payload"]:
            line += f" payload {row['payload']} (mark id {row['mark_id']})"
            led = row["ledger"]
            line += (
                f" -> ledger entry {led['seq']} {led['time']} {led['subject']}"
                if isinstance(led, dict)
                else f" -> {led}"
            )
        elif row["marked"]:
            line += " payload unreadable (mark present, payload damaged)"
        console.print(line, highlight=False, soft_wrap=True)
    if fail_unmarked and any_unmarked:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- identify


def _lineage_summary(tree: dict[str, Any], series_uid: str) -> dict[str, Any]:
    """Source study / series, model and destinations of one output series from a lineage tree
    (:func:`audit.export.lineage`)."""
    studies = sorted({str(s.get("study_uid")) for s in tree.get("sources", [])
                      if s.get("study_uid")})
    out: dict[str, Any] = {"source_studies": studies,
                           "source_series": [s.get("series_uid") for s in tree.get("sources", [])],
                           "model": None, "destinations": []}
    for job in tree.get("jobs", []):
        for o in job.get("outputs", []):
            if o.get("series_uid") != series_uid:
                continue
            out["model"] = {k: job.get(k) for k in ("task", "model_id", "model_version",
                                                     "weights_sha256")}
            out["job_id"] = job.get("job_id")
            out["destinations"] = sorted({
                f"{d.get('destination') or d.get('payload', {}).get('destination')}: "
                f"{d.get('type') or d.get('outcome') or ''}".rstrip(": ")
                for d in o.get("dispatches", [])})
    return out


def _proof(ledger: Any, seq: int) -> dict[str, Any]:
    """RFC 9162 inclusion proof of entry ``seq`` in the latest checkpointed tree that holds
    it (else the current tree), verified before it is reported."""
    from audit import merkle

    cps = [c for c in ledger.checkpoints() if c[0] > seq]
    size, note = (cps[-1][0], cps[-1][2]) if cps else (ledger.size(), None)
    entry = ledger.entry(seq)
    proof = ledger.inclusion_proof(seq, size)
    root = ledger.root(size)
    merkle.verify_inclusion(seq, size, entry.leaf_hash, proof, root)
    out: dict[str, Any] = {"seq": seq, "tree_size": size, "leaf_hash": entry.leaf_hash.hex(),
                           "root_hash": root.hex(), "proof": [p.hex() for p in proof],
                           "verified": True}
    if note:
        out["checkpoint"] = note
    return out


@app.command("identify")
def identify_cmd(
    path: Path = typer.Argument(..., help="a DICOM, PNG or JPEG file (a leaked rendering)"),
    key_files: list[Path] = typer.Option([], "--key", help="extra key files to try"),
    top: int = typer.Option(5, "--top", min=1, max=50, help="closest fingerprints to list"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object"),
    config: Path | None = ConfigOption,
) -> None:
    """Identify an image as one of our outputs: the mark if present, else the closest recorded
    slice fingerprints with a calibrated score; with the output series, its lineage (source
    study, model, destinations) and an inclusion proof of its ledger entry.

    Exempt from the mark's detection aim (the fingerprint is the way there): lung-window
    JPEG q75 and 0.5x resizes of small slices, where a mark within the fidelity bound does not
    survive (docs/watermark.md, "What is exempt and why")."""
    from audit.events import EventType
    from audit.export import lineage
    from audit.ledger import Ledger
    from audit.watermark.fingerprint import MATCH_DISTANCE, FingerprintIndex

    settings = settings_from(config)
    if not path.is_file():
        fail(f"{path}: no such file")
    try:
        pixels = read_pixels(path)
    except Exception as exc:
        fail(f"{path}: unreadable ({exc})")
        return
    keys = [k for k in (_try_keys(settings, key_files)) if k]
    det = detect(pixels, keys) if keys else None
    engine = open_engine(settings, config)
    try:
        ledger = Ledger(engine)
        created = ledger.query(event_types=[EventType.OUTPUT_CREATED.value])
        by_payload = {str(e.event.payload.get("watermark_payload", "")).lower(): e
                      for e in created if e.event.payload.get("watermark_payload")}
        index = FingerprintIndex()
        for e in created:
            index.add_event(e.seq, e.event.payload)
        frame = pixels if pixels.ndim == 2 or pixels.shape[-1] in (3, 4) else pixels[0]
        matches = index.search(frame, top)  # crop search included
        result: dict[str, Any] = {
            "file": str(path),
            "mark": None if det is None else {
                "marked": det.marked, "score": round(det.score, 2),
                "threshold": round(det.threshold, 2), "payload": det.payload_hex,
                "key_id": det.key_id, "format_version": det.format_version},
            "fingerprints_recorded": len(index), "match_distance": MATCH_DISTANCE,
            "candidates": [m.__dict__ for m in matches], "identified": None,
        }
        hit = None
        if det is not None and det.payload_hex and det.payload_hex in by_payload:
            e = by_payload[det.payload_hex]
            hit = ("mark", e.seq, str(e.event.payload.get("output_series_uid")
                                      or e.event.subject.get("series_uid")))
        elif matches and matches[0].matched:
            hit = ("fingerprint", matches[0].seq, matches[0].series_uid)
        if hit is not None:
            how, seq, series_uid = hit
            ev = ledger.entry(seq).event
            result["identified"] = {
                "by": how, "seq": seq, "output_series_uid": series_uid,
                "study_uid": ev.subject.get("study_uid"), "time": ev.time.isoformat(),
                "watermark_format": ev.payload.get("watermark_format"),
                "lineage": _lineage_summary(lineage(ledger, series_uid), series_uid),
                "inclusion_proof": _proof(ledger, seq),
            }
    finally:
        engine.dispose()
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        return
    _print_identify(result)


def _try_keys(settings: Any, extra: list[Path]) -> list[WatermarkKey]:
    """The configured keys that exist (identify works without any: fingerprints only)."""
    keys = []
    for p in [settings.watermark_key_file, *settings.watermark.extra_key_files, *extra]:
        if Path(p).is_file():
            try:
                keys.append(WatermarkKey.from_file(p))
            except ValueError as exc:
                fail(str(exc))
    return keys


def _print_identify(r: dict[str, Any]) -> None:
    mark = r["mark"]
    if mark is None:
        console.print("mark: no watermark key configured (fingerprints only)")
    elif mark["marked"]:
        console.print(f"mark: [green]MARKED[/green] score {mark['score']} (threshold "
                      f"{mark['threshold']}) payload {mark['payload'] or 'unreadable'}",
                      highlight=False)
    else:
        console.print(f"mark: not found (score {mark['score']} < {mark['threshold']})",
                      highlight=False)
    console.print(f"fingerprints: {r['fingerprints_recorded']} recorded slices; closest "
                  f"(match at distance <= {r['match_distance']} of 143 bits):", highlight=False)
    for m in r["candidates"]:
        console.print(f"  distance {m['distance']:3d}  score {m['score']:6.2f}  "
                      f"{'MATCH' if m['matched'] else '     '}  entry {m['seq']} series "
                      f"{m['series_uid']} slice {m['slice_index']} sop {m['sop_uid']}",
                      highlight=False, soft_wrap=True)
    hit = r["identified"]
    if hit is None:
        console.print("identified: no (no readable mark, no fingerprint at the match level)")
        return
    lin = hit["lineage"]
    model = lin.get("model") or {}
    console.print(
        f"identified by {hit['by']}: output series {hit['output_series_uid']} (ledger entry "
        f"{hit['seq']}, {hit['time']}); source study {', '.join(lin['source_studies']) or '-'}; "
        f"model {model.get('model_id')} {model.get('model_version') or ''}; destinations "
        f"{', '.join(lin['destinations']) or 'none'}", highlight=False, soft_wrap=True)
    p = hit["inclusion_proof"]
    console.print(f"inclusion proof: entry {p['seq']} in tree of {p['tree_size']} (root "
                  f"{p['root_hash'][:16]}...), {len(p['proof'])} hashes, verified"
                  + (", signed checkpoint" if p.get("checkpoint") else ""), highlight=False)
