"""How audit findings are shown to a person, shared by the CLI (``synthnode audit lineage`` /
``audit patient``, ``synthnode watermark detect``) and the console: the lineage as a text
tree (rich), and a watermark detection described with the ledger entry it resolves to."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape
from rich.tree import Tree

from audit.watermark import Detection, split_payload

__all__ = ["IMAGE_SUFFIXES", "LedgerIndex", "describe_detection", "lineage_tree", "read_pixels",
           "retrieval_text"]

#: uploads / files read as plain images (anything else as DICOM)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def _short(value: Any, n: int = 16) -> str:
    return escape(str(value)[:n]) if value else "?"


def _dispatch_nodes(parent: Tree, dispatches: list[dict[str, Any]],
                    dispatch_jobs: list[dict[str, Any]] | None = None) -> None:
    """Dispatches of one series: destination -> dispatch job (id, state) -> each attempt
    and outcome; a destination served by one job (or none recorded) shows its events
    directly."""
    dests: dict[str, dict[str, list[dict[str, Any]]]] = {}
    state = {str(j["job_id"]): j.get("state") for j in dispatch_jobs or []}
    for j in dispatch_jobs or []:
        dests.setdefault(str(j.get("destination")), {}).setdefault(str(j["job_id"]), [])
    for d in dispatches:
        dests.setdefault(str(d.get("destination")), {}).setdefault(
            str(d.get("job_id") or ""), []
        ).append(d)

    def job_label(jid: str) -> str:
        return (
            f"dispatch job {_short(jid, 8)} {escape(str(state.get(jid) or ''))}".rstrip()
            if jid
            else ""
        )

    for dest, by_job in dests.items():
        label = f"-> [bold]{escape(dest)}[/bold]"
        if len(by_job) == 1:
            (jid, items), = by_job.items()
            dn = parent.add(f"{label} ({job_label(jid)})" if jid else label)
            groups = [(dn, items)]
        else:
            dn = parent.add(label)
            groups = [
                (dn.add(job_label(jid) or "no job id"), items) for jid, items in by_job.items()
            ]
        for node, items in groups:
            for d in items:
                extra = " ".join(
                    f"{k}={escape(str(d[k]))[:60]}"
                    for k in ("attempt", "state", "acknowledged", "error")
                    if d.get(k) not in (None, "")
                )
                node.add(f"#{d['seq']} {d['type']} {d['time']} {extra}".rstrip())
            if not items:
                node.add("no send attempt yet")


def retrieval_text(r: dict[str, Any]) -> str:
    """``#seq C-GET by ae:X at TIME: N instance(s), status 0x0000`` (escaped for rich)."""
    text = f"#{r['seq']} {r['service']} by {r['actor']}"
    if r.get("destination"):
        text += f" to {r['destination']}"
    text += f" at {r['time']}"
    if r.get("instances") is not None:
        text += f": {r['instances']} instance(s) of this series"
    if isinstance(r.get("status"), int):
        text += f", status 0x{r['status']:04X}"
    if r.get("outcome") not in (None, "success"):
        text += f" ({r['outcome']})"
    return escape(text)


def _retrieval_nodes(parent: Tree, retrievals: list[dict[str, Any]]) -> None:
    """Each retrieval of a series (C-GET, C-MOVE, WADO) as ``retrieved ...`` lines."""
    for r in retrievals:
        parent.add("retrieved: " + retrieval_text(r))


def _job_node(parent: Tree, j: dict[str, Any]) -> None:
    model = escape(str(j.get("model_id") or "model not recorded"))
    if j.get("model_version"):
        model += f" {escape(str(j['model_version']))}"
    if j.get("weights_sha256"):
        model += f" weights sha256:{_short(j['weights_sha256'])}"
    jn = parent.add(
        f"engine job [bold]{escape(str(j['job_id']))}[/bold] {escape(str(j.get('task') or ''))} "
        f"model {model}"
    )
    for e in j["events"]:
        extra = " ".join(
            f"{k}={escape(str(e[k]))[:60]}"
            for k in ("attempt", "seed", "device", "error")
            if k in e
        )
        jn.add(f"#{e['seq']} {e['type']} {e['time']} {extra}".rstrip())
    for h in j.get("held") or []:
        what = (f"output {h['series_uid']} refused dispatch" if h.get("series_uid")
                else f"output {h.get('output_index')} held by the quality gate")
        checks = f" ({', '.join(h['checks'])})" if h.get("checks") else ""
        jn.add(f"#{h['seq']} [yellow]{escape(what)}[/yellow]{escape(checks)}: "
               + escape("; ".join(h["reasons"])))
    for x in j.get("discarded") or []:
        what = f"output {x['series_uid']}" if x.get("series_uid") else "held output"
        jn.add(
            f"#{x['seq']} {escape(what)} discarded by {escape(str(x.get('actor')))}: "
            f"{escape(str(x.get('reason')))}"
        )
    for r in j.get("released") or []:
        jn.add(f"#{r['seq']} [green]held output released[/green] by "
               f"{escape(str(r.get('actor')))} (job {escape(str(r.get('job_id')))}): "
               f"{escape(str(r.get('reason')))}")
    for o in j["outputs"]:
        on = jn.add(f"#{o['seq']} output series [bold]{escape(str(o['series_uid']))}[/bold] "
                    f"({o['sop_uids']} SOP, {escape(str(o.get('output_format') or '?'))}) "
                    f"watermark {escape(str(o['watermark_payload']))}")
        _dispatch_nodes(on, o["dispatches"], o.get("dispatch_jobs"))
        if not o["dispatches"] and not o.get("dispatch_jobs"):
            on.add("no dispatch")
        _retrieval_nodes(on, o.get("retrievals") or [])


def lineage_tree(tree: dict[str, Any]) -> Tree:
    """The ``audit lineage`` tree: source series -> engine jobs -> output series ->
    destinations (each dispatch event); jobs whose source is not in the ledger under their
    own branch."""
    root = Tree(f"[bold]{escape(str(tree['uid']))}[/bold] ({len(tree['entries'])} entries)")
    placed: set[str] = set()
    for s in tree["sources"]:
        node = root.add(f"source series [bold]{escape(str(s['series_uid']))}[/bold] "
                        f"(study {escape(str(s['study_uid']))}) from {escape(str(s['from']))}: "
                        f"{len(s['instances'])} instance(s)")
        inst = node.add("instances")
        for i in s["instances"][:5]:
            inst.add(f"#{i['seq']} {escape(str(i['sop_uid']))} sha256 {_short(i['sha256'])}")
        if len(s["instances"]) > 5:
            inst.add(f"... {len(s['instances']) - 5} more")
        if s.get("dispatches"):
            _dispatch_nodes(node.add("forwarded as received"), s["dispatches"])
        _retrieval_nodes(node, s.get("retrievals") or [])
        for j in tree["jobs"]:
            if s["series_uid"] in j["source_series_uids"]:
                _job_node(node, j)
                placed.add(str(j["job_id"]))
    rest = [j for j in tree["jobs"] if str(j["job_id"]) not in placed]
    if rest:
        other = root.add("engine jobs whose source series is not in this lineage")
        for j in rest:
            _job_node(other, j)
    if tree.get("other_retrievals"):
        _retrieval_nodes(root.add("other retrievals of the study (whole study, or other series)"),
                         tree["other_retrievals"])
    if tree.get("unattached_dispatches"):
        _dispatch_nodes(
            root.add("dispatches of series not in this lineage"), tree["unattached_dispatches"]
        )
    return root


# -- watermark detections ---------------------------------------------------------------


def read_pixels(path: Path) -> np.ndarray:
    """The pixels of a PNG / JPEG (as 8-bit grey) or of a DICOM file, for watermark
    detection."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from PIL import Image

        return np.asarray(Image.open(path).convert("L"))
    import pydicom

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise ValueError("no Pixel Data")
    return ds.pixel_array


@dataclass
class LedgerIndex:
    """``watermark_payload`` hex -> the ``output.created`` entry (seq, time, subject), or
    why the ledger could not be read."""

    by_payload: dict[str, dict[str, Any]]
    error: str | None = None


def describe_detection(path: Path, det: Detection, ledger: LedgerIndex) -> dict[str, Any]:
    """One detection as ``watermark detect`` and the console's watermark check show it: the
    mark, its payload (key id, mark id) and the ledger entry of the output carrying it."""
    row: dict[str, Any] = {
        "file": str(path), "marked": det.marked, "score": round(det.score, 2),
        "threshold": round(det.threshold, 2), "key_id": det.key_id, "payload": det.payload_hex,
        "scale": det.scale, "ledger": None,
    }
    if det.payload is not None:
        kid, mid = split_payload(det.payload)
        row["mark_id"] = mid
        row["payload_key_id"] = kid
        if ledger.error:
            row["ledger"] = ledger.error
        else:
            row["ledger"] = (
                ledger.by_payload.get(det.payload_hex or "")
                or "no output.created event with this payload"
            )
    return row
