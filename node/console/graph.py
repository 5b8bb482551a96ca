"""The lineage of :func:`audit.export.lineage` as a graph drawn server-side in SVG.

Layers, left to right: source series -> engine job -> model -> output (created, held by the
quality gate, refused for its watermark, discarded) -> destination -> send attempts. Each
node is a link (the study, the job, the Models page, the ledger entry) and says its state in
words (``HELD``, ``REFUSED``, ``FAILED``, ...), the colour only repeating it. The layout is a
plain layered one: a node's row is the first free row of its column at or below its
parent's row, so a parent's children stack beside it. No script, nothing fetched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from markupsafe import Markup, escape

__all__ = ["LAYERS", "Graph", "GraphNode", "lineage_graph", "render_svg"]

#: column titles, in order
LAYERS = ["source series", "engine job", "model", "output", "destination", "attempts"]
#: states drawn with a colour (fill, stroke); the word is always written in the node
_COLOURS = {"ok": ("#e8f5e9", "#2e7d32"), "held": ("#fff3cd", "#b26a00"),
            "refused": ("#ffe0cc", "#b34700"), "failed": ("#fde2e2", "#b00020"),
            "discarded": ("#eeeeee", "#555555"), "released": ("#e3f2fd", "#1565c0"),
            "": ("#ffffff", "#1d3557")}
_MAX_ATTEMPTS = 6  # per destination; the rest summed up in one node
_W, _H, _GAP_X, _GAP_Y, _PAD = 172, 58, 26, 14, 8


@dataclass
class GraphNode:
    id: str
    layer: int
    kind: str
    title: str
    state: str = ""  # a key of _COLOURS
    state_text: str = ""  # the word(s) written in the node: HELD, FAILED, DELIVERED ...
    detail: str = ""
    href: str = ""
    tooltip: str = ""
    row: int = 0


@dataclass
class Graph:
    nodes: dict[str, GraphNode] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)

    def add(self, node: GraphNode, parent: str | None = None) -> str:
        self.nodes.setdefault(node.id, node)
        if parent is not None and (parent, node.id) not in self.edges:
            self.edges.append((parent, node.id))
        return node.id


def _short(value: Any, n: int = 20) -> str:
    s = str(value or "?")
    return s if len(s) <= n else "…" + s[-(n - 1):]


def _entry(prefix: str, seq: Any) -> str:
    return f"{prefix}/audit?seq={int(seq)}"


def _job_state(events: list[dict[str, Any]]) -> tuple[str, str]:
    last = events[-1]["type"] if events else ""
    word = {"job.queued": "QUEUED", "job.started": "RUNNING", "job.finished": "SUCCEEDED",
            "job.failed": "FAILED", "job.cancelled": "CANCELLED"}.get(last, "")
    state = {"SUCCEEDED": "ok", "FAILED": "failed", "CANCELLED": "discarded"}.get(word, "")
    return state, word


def _attempt(d: dict[str, Any]) -> tuple[str, str]:
    t = str(d.get("type", ""))
    if t.endswith("failed"):
        return "failed", "FAILED"
    if t.endswith("succeeded"):
        return "ok", "SENT"
    return "", "ATTEMPTED"


def _destinations(g: Graph, prefix: str, parent: str | None, series: str,
                  dispatches: list[dict[str, Any]],
                  dispatch_jobs: list[dict[str, Any]] | None) -> None:
    """One node per destination of ``series`` (state: delivered / failed / pending, from its
    dispatch jobs and attempts) and its attempts."""
    dests: dict[str, dict[str, Any]] = {}
    for j in dispatch_jobs or []:
        d = dests.setdefault(str(j.get("destination")), {"jobs": {}, "items": []})
        d["jobs"][str(j["job_id"])] = j.get("state")
    for x in dispatches:
        d = dests.setdefault(str(x.get("destination")), {"jobs": {}, "items": []})
        if x.get("job_id"):
            d["jobs"].setdefault(str(x["job_id"]), None)
        d["items"].append(x)
    for dest, d in dests.items():
        types = [str(x.get("type")) for x in d["items"]]
        states = set(d["jobs"].values())
        if "dispatch.succeeded" in types or "succeeded" in states:
            state, word = "ok", "DELIVERED"
        elif "failed" in states or (types and types[-1] == "dispatch.failed"):
            state, word = "failed", "FAILED"
        else:
            state, word = "", "PENDING"
        jobs = [j for j in d["jobs"] if j]
        nid = g.add(GraphNode(
            id=f"d:{series}:{dest}", layer=4, kind="destination", title=dest, state=state,
            state_text=word, detail=f"dispatch job {jobs[0][:8]}" if len(jobs) == 1 else
            f"{len(jobs)} dispatch jobs" if jobs else "",
            href=f"{prefix}/jobs/{quote(jobs[0])}" if len(jobs) == 1 else "",
            tooltip=f"{dest}: {word.lower()}; series {series}"), parent)
        items = d["items"]
        for x in items[:_MAX_ATTEMPTS]:
            st, w = _attempt(x)
            extra = " ".join(f"{k} {x[k]}" for k in ("attempt", "error") if x.get(k))
            g.add(GraphNode(id=f"a:{x['seq']}", layer=5, kind="attempt",
                            title=f"#{x['seq']} {str(x.get('type')).rpartition('.')[2]}",
                            state=st, state_text=w,
                            detail=str(x.get("time", ""))[:19], href=_entry(prefix, x["seq"]),
                            tooltip=f"ledger entry {x['seq']}: {x.get('type')} {extra}".strip()),
                  nid)
        if len(items) > _MAX_ATTEMPTS:
            g.add(GraphNode(id=f"a:{nid}:more", layer=5, kind="attempt",
                            title=f"{len(items) - _MAX_ATTEMPTS} more", detail="see the text view",
                            tooltip="more attempts: the text view lists every one"), nid)


def _job(g: Graph, prefix: str, j: dict[str, Any], parents: list[str],
         study: str | None) -> None:
    state, word = _job_state(j.get("events") or [])
    jid = str(j["job_id"])
    jn = GraphNode(id=f"j:{jid}", layer=1, kind="engine job", title=f"job {jid[:8]}",
                   state=state, state_text=word, detail=str(j.get("task") or ""),
                   href=f"{prefix}/jobs/{quote(jid)}", tooltip=f"engine job {jid}")
    if not parents:
        g.add(jn)
    for p in parents:
        g.add(jn, p)
    model = str(j.get("model_id") or "model not recorded")
    mid = g.add(GraphNode(
        id=f"m:{jid}", layer=2, kind="model", title=model,
        detail=f"{j.get('model_version') or ''} "
               f"{('sha256 ' + str(j['weights_sha256'])[:10]) if j.get('weights_sha256') else ''}"
        .strip(), href=f"{prefix}/models", tooltip=f"model {model} used by job {jid}"), jn.id)
    study_href = f"{prefix}/studies/{quote(study)}" if study else ""
    for o in j.get("outputs") or []:
        series = str(o["series_uid"])
        on = g.add(GraphNode(
            id=f"o:{series}", layer=3, kind="output series", title=_short(series),
            state="ok", state_text="CREATED", detail=f"{o.get('sop_uids')} SOP, "
            f"{o.get('output_format') or '?'}", href=study_href or _entry(prefix, o["seq"]),
            tooltip=f"synthetic series {series}, ledger entry {o['seq']}"), mid)
        _destinations(g, prefix, on, series, o.get("dispatches") or [], o.get("dispatch_jobs"))
    released = j.get("released") or []
    discarded = j.get("discarded") or []
    for h in j.get("held") or []:
        refused = bool(h.get("series_uid"))
        if refused:
            state, word = "refused", "REFUSED"
            title = f"output {_short(h['series_uid'], 16)}"
        else:
            state, word = "held", "HELD"
            title = f"held output {h.get('output_index')}"
        detail = "; ".join(h.get("reasons") or [])
        if released and not refused:
            state, word = "released", "HELD, RELEASED"
            detail = f"by {released[0].get('actor')}: {released[0].get('reason')}"
        elif discarded:
            state, word = "discarded", f"{word}, DISCARDED"
            detail = f"by {discarded[0].get('actor')}: {discarded[0].get('reason')}"
        g.add(GraphNode(
            id=f"h:{h['seq']}", layer=3, kind="output", title=title, state=state,
            state_text=word, detail=detail[:80],
            href=f"{prefix}/jobs/{quote(jid)}",
            tooltip=f"ledger entry {h['seq']}: {word.lower()} "
                    + "; ".join(h.get("reasons") or []) + f" ({detail})"), mid)
    if discarded and not j.get("held"):
        for x in discarded:
            g.add(GraphNode(id=f"x:{x['seq']}", layer=3, kind="output", title="partial output",
                            state="discarded", state_text="DISCARDED",
                            detail=str(x.get("reason") or "")[:60], href=_entry(prefix, x["seq"]),
                            tooltip=f"ledger entry {x['seq']}: discarded by {x.get('actor')}"),
                  mid)


def lineage_graph(tree: dict[str, Any], prefix: str = "/console") -> Graph:
    """The nodes and edges of a lineage tree (:func:`audit.export.lineage`), laid out."""
    g = Graph()
    study_of: dict[str, str] = {}
    for s in tree.get("sources") or []:
        series = str(s["series_uid"])
        study = str(s.get("study_uid") or "")
        study_of[series] = study
        sid = g.add(GraphNode(
            id=f"s:{series}", layer=0, kind="source series", title=_short(series),
            detail=f"{len(s.get('instances') or [])} instance(s) from {s.get('from')}",
            href=f"{prefix}/studies/{quote(study)}" if study else "",
            tooltip=f"source series {series} of study {study}"))
        if s.get("dispatches"):  # forwarded as received
            _destinations(g, prefix, sid, series, s["dispatches"], None)
    for j in tree.get("jobs") or []:
        srcs = [str(u) for u in j.get("source_series_uids") or []]
        parents = [f"s:{u}" for u in srcs if f"s:{u}" in g.nodes]
        _job(g, prefix, j, parents, next((study_of[u] for u in srcs if study_of.get(u)), None))
    for x in tree.get("unattached_dispatches") or []:
        _destinations(g, prefix, None, str(x.get("series_uid")), [x], None)
    _layout(g)
    return g


def _layout(g: Graph) -> None:
    """Rows: depth first from the roots, each node at the first free row of its column at or
    below its parent's row."""
    children: dict[str, list[str]] = {}
    has_parent: set[str] = set()
    for a, b in g.edges:
        children.setdefault(a, []).append(b)
        has_parent.add(b)
    free = [0] * len(LAYERS)
    placed: set[str] = set()

    def place(nid: str, at: int) -> None:
        if nid in placed:
            return
        placed.add(nid)
        n = g.nodes[nid]
        n.row = max(free[n.layer], at)
        free[n.layer] = n.row + 1
        for c in children.get(nid, []):
            place(c, n.row)

    for nid in g.nodes:
        if nid not in has_parent:
            place(nid, 0)
    for nid in g.nodes:  # a cycle cannot happen; kept safe anyway
        place(nid, 0)


def _line(x: int, y: int, text: str, cls: str, limit: int = 30) -> str:
    t = text if len(text) <= limit else text[:limit - 1] + "…"
    return f'<text x="{x}" y="{y}" class="{cls}">{escape(t)}</text>'


def render_svg(g: Graph) -> Markup:
    """The graph as inline SVG: a title per column, one link per node (its state in words),
    arrows between them."""
    rows = max((n.row for n in g.nodes.values()), default=0) + 1
    width = _PAD * 2 + len(LAYERS) * _W + (len(LAYERS) - 1) * _GAP_X
    top = 28
    height = top + rows * (_H + _GAP_Y) + _PAD

    def pos(n: GraphNode) -> tuple[int, int]:
        return _PAD + n.layer * (_W + _GAP_X), top + n.row * (_H + _GAP_Y)

    out = [f'<svg id="lineage-graph" xmlns="http://www.w3.org/2000/svg" role="group" '
           f'aria-label="lineage graph: {len(g.nodes)} nodes, {len(g.edges)} links" '
           f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
           "<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" "
           "markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\">"
           "<path d=\"M0,0 L10,5 L0,10 z\" fill=\"#555\"/></marker></defs>",
           "<style>.k{font:11px system-ui,sans-serif;fill:#444}"
           ".t{font:bold 12px ui-monospace,monospace;fill:#111}"
           ".s{font:bold 11px system-ui,sans-serif;fill:#111}"
           ".d{font:11px system-ui,sans-serif;fill:#333}.col{font:bold 12px system-ui;fill:#1d3557}"
           "a:focus rect{stroke:#f90;stroke-width:4}.edge{fill:none;stroke:#555;stroke-width:1.4}"
           "</style>"]
    for i, name in enumerate(LAYERS):
        out.append(_line(_PAD + i * (_W + _GAP_X), 16, name, "col"))
    for a, b in g.edges:
        na, nb = g.nodes[a], g.nodes[b]
        (xa, ya), (xb, yb) = pos(na), pos(nb)
        x1, y1, x2, y2 = xa + _W, ya + _H // 2, xb, yb + _H // 2
        mid = (x1 + x2) // 2
        out.append(f'<path class="edge" data-from="{escape(a)}" data-to="{escape(b)}" '
                   f'd="M{x1},{y1} C{mid},{y1} {mid},{y2} {x2 - 2},{y2}" '
                   f'marker-end="url(#arrow)"/>')
    for n in g.nodes.values():
        x, y = pos(n)
        fill, stroke = _COLOURS.get(n.state, _COLOURS[""])
        label = f"{n.kind} {n.title}" + (f", {n.state_text}" if n.state_text else "") + (
            f", {n.detail}" if n.detail else "")
        body = [f'<title>{escape(n.tooltip or label)}</title>',
                f'<rect x="{x}" y="{y}" width="{_W}" height="{_H}" rx="6" fill="{fill}" '
                f'stroke="{stroke}" stroke-width="{2 if n.state else 1}"/>',
                _line(x + 6, y + 14, n.kind + (f" · {n.state_text}" if n.state_text else ""),
                      "s" if n.state_text else "k", 26),
                _line(x + 6, y + 31, n.title, "t", 21),
                _line(x + 6, y + 48, n.detail, "d", 27)]
        attrs = (f'class="node state-{n.state or "none"}" data-id="{escape(n.id)}" '
                 f'data-kind="{escape(n.kind)}" data-state="{escape(n.state_text)}"')
        if n.href:
            out.append(f'<a href="{escape(n.href)}" aria-label="{escape(label)}" {attrs}>'
                       + "".join(body) + "</a>")
        else:
            out.append(f'<g {attrs} aria-label="{escape(label)}">' + "".join(body) + "</g>")
    out.append("</svg>")
    return Markup("\n".join(out))
