"""DICOMweb benchmark: synthnode's server vs Orthanc's DICOMweb plugin, side by side in one
run, same data, same client (httpx, one connection, sequential requests).

Both servers start fresh on loopback: ``synthnode serve`` in a subprocess (SQLite index,
file store with fsync, ledger: the production durability path; reads recorded in the ledger)
and the Debian ``Orthanc`` with ``orthanc-dicomweb`` (tests/support/orthanc.py).

Rows:

* STOW-RS instances/s: every instance sent in requests of 10 CT slices (512x512, 16 bit,
  ~513 KB each), one request at a time;
* QIDO-RS study search latency, median and p95 of ``--queries`` searches
  (``/studies?PatientName=P0001*`` style wildcard, ``/studies?StudyDate=range``,
  ``/studies?PatientID=...``, cycled) on the index the STOW phase built; also per kind of
  search, with the studies each server found (Orthanc 1.10.1's DICOMweb plugin 1.7 answers
  every PatientName search with ``[]`` here, so its PatientName median times an empty
  answer);
* WADO-RS series retrieval MB/s (``transfer-syntax=*``, the stored bytes), over every series;
* series metadata latency (median) and frame latency (median of ``frames/1`` of
  ``--frames`` instances, ``transfer-syntax=*``).

Usage (exact command behind the DICOMweb table of bench/RESULTS.md)::

    nice -n 10 python bench/bench_dicomweb.py --studies 20 --slices 50 --queries 200 \\
        --frames 100 [--servers synthnode synthnode-pg orthanc] [--settle 5] [--rounds 4]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import tomli_w
from pydicom import dcmwrite

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.dicomweb import multipart
from tests.support.dimse import NodeProcess, node_settings_dict
from tests.support.factory import make_series
from tests.support.net import get_port, wait_for
from tests.support.orthanc import OrthancServer

TOKEN = "bench-token"
CTYPE = 'multipart/related; type="application/dicom"; boundary=b0undary'


def make_data(studies: int, slices: int, size: int) -> list[tuple[str, str, str, list[bytes]]]:
    """(patient id, study uid, series uid, part10 files) per study."""
    out = []
    for i in range(studies):
        series = make_series(slices, size, size, shuffle=False, seed=i)
        files = []
        for ds in series:
            ds.PatientID = f"P{i:04d}"
            ds.PatientName = f"P{i:04d}^Bench"
            ds.StudyDate = f"2020{1 + i % 12:02d}{1 + i % 28:02d}"
            buf = io.BytesIO()
            dcmwrite(buf, ds, enforce_file_format=True)
            files.append(buf.getvalue())
        out.append((series[0].PatientID, str(series[0].StudyInstanceUID),
                    str(series[0].SeriesInstanceUID), files))
    return out


def timed(c: httpx.Client, url: str, accept: str, **params: str) -> float:
    """Seconds one GET takes (the whole body read; raises on an error status)."""
    t = time.perf_counter()
    c.get(url, params=params or None, headers={"Accept": accept}).raise_for_status()
    return time.perf_counter() - t


def stats(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs), xs[max(0, round(0.95 * len(xs)) - 1)]


def run_server(name: str, root: str, headers: dict[str, str], data: Any,
               args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"server": name}
    with httpx.Client(base_url=root, headers=headers, timeout=300) as c:
        n = 0
        t0 = time.perf_counter()
        for _, _, _, files in data:
            for k in range(0, len(files), 10):
                r = c.post("/studies", content=multipart(files[k:k + 10]),
                           headers={"Content-Type": CTYPE})
                assert r.status_code == 200, (name, r.status_code, r.text[:300])
                n += len(files[k:k + 10])
        res["stow_inst_s"] = n / (time.perf_counter() - t0)
        time.sleep(args.settle)  # the same pause for every server
        queries: list[dict[str, str]] = []
        for i in range(args.queries):
            pid, _, _, _ = data[i % len(data)]
            queries.append([{"PatientName": f"{pid[:4]}*"}, {"PatientID": pid},
                            {"StudyDate": "20200301-20200630"}][i % 3])
        lat = []
        by_key: dict[str, list[float]] = {}
        found: dict[str, int] = {}
        for q in queries:
            t = time.perf_counter()
            r = c.get("/studies", params=q, headers={"Accept": "application/dicom+json"})
            r.raise_for_status()
            lat.append(time.perf_counter() - t)
            key = next(iter(q))
            by_key.setdefault(key, []).append(lat[-1])
            found[key] = found.get(key, 0) + len(r.json())
        res["qido_median_ms"], res["qido_p95_ms"] = (x * 1000 for x in stats(lat))
        for key, xs in by_key.items():  # per kind of search, with the studies it found
            res[f"qido_{key}_ms"] = statistics.median(xs) * 1000
            res[f"qido_{key}_found"] = found[key]
        total_bytes, t_wado = 0, 0.0
        md, md2 = [], []
        for _, st, se, _ in data:
            t = time.perf_counter()
            r = c.get(f"/studies/{st}/series/{se}", headers={
                "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
            r.raise_for_status()
            t_wado += time.perf_counter() - t
            total_bytes += len(r.content)
            md.append(timed(c, f"/studies/{st}/series/{se}/metadata", "application/dicom+json"))
            md2.append(timed(c, f"/studies/{st}/series/{se}/metadata", "application/dicom+json"))
        res["wado_mb_s"] = total_bytes / t_wado / 1e6
        res["metadata_median_ms"] = statistics.median(md) * 1000
        res["metadata2_median_ms"] = statistics.median(md2) * 1000
        inst = c.get(f"/studies/{data[0][1]}/series/{data[0][2]}/instances",
                     headers={"Accept": "application/dicom+json"}).json()
        sops = [x["00080018"]["Value"][0] for x in inst]
        fl = []
        for i in range(args.frames):
            sop = sops[i % len(sops)]
            fl.append(timed(c, f"/studies/{data[0][1]}/series/{data[0][2]}/instances/{sop}"
                            "/frames/1", 'multipart/related; type="application/octet-stream"; '
                            'transfer-syntax=*'))
        res["frame_median_ms"] = statistics.median(fl) * 1000
    return res


def pg_database(admin: str) -> tuple[str, Callable[[], None]]:
    """A fresh PostgreSQL database on ``admin``'s server and its drop function."""
    import uuid

    import psycopg

    name = f"sn_bench_{uuid.uuid4().hex[:10]}"
    plain = admin.replace("+psycopg", "")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return f"{admin.rsplit('/', 1)[0]}/{name}", drop


def start_synthnode(work: Path, database_url: str | None = None,
                    warm: bool = True) -> tuple[NodeProcess, str]:
    data_dir = work / "node"
    data_dir.mkdir()
    port = get_port()
    cfg = work / "node.toml"
    web = {"enabled": True, "port": get_port(), "access_flush_s": 1.0, "metadata_warm": warm,
           "tokens": [{"name": "bench", "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                       "scopes": ["store", "read"]}]}
    settings = node_settings_dict(data_dir, port, dicomweb=web, log_level="WARNING",
                                  logging={"instances": "DEBUG", "associations": "DEBUG"})
    if database_url:
        settings["database"] = {"url": database_url}
    cfg.write_bytes(tomli_w.dumps(settings).encode())
    proc = NodeProcess(config=cfg, data_dir=data_dir, port=port, log=work / "node.log").start()
    m = wait_for(lambda: re.search(r"DICOMweb (\S+)/studies", proc.output()), 30, "DICOMweb")
    assert isinstance(m, re.Match)
    return proc, m.group(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--slices", type=int, default=50)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds to wait after the STOW phase before the reads (a viewer "
                         "opening a study some seconds after it arrived)")
    ap.add_argument("--servers", nargs="+", default=["synthnode", "orthanc"],
                    help="synthnode, synthnode-pg (index + ledger on PostgreSQL), "
                    "synthnode-lazy (no background metadata builder: the first metadata "
                    "read of a series parses its files), orthanc")
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                    help="PostgreSQL server for synthnode-pg (a fresh database is made)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds, the servers' order reversed every other round; with more "
                    "than one, each cell is the median over the rounds (min-max after it)")
    args = ap.parse_args()
    data = make_data(args.studies, args.slices, args.size)
    results: list[dict[str, Any]] = []
    order = [args.servers if r % 2 == 0 else args.servers[::-1] for r in range(args.rounds)]
    work = Path(tempfile.mkdtemp(prefix="bench-dicomweb-"))
    try:
        for name in (n for names in order for n in names):
            # the previous server's files gone and every dirty page written: a server
            # that flushes each instance would otherwise pay for the one before it
            for old in work.iterdir():
                shutil.rmtree(old, ignore_errors=True)
            os.sync()
            if name in ("synthnode", "synthnode-pg", "synthnode-lazy"):
                url, drop = pg_database(args.pg) if name == "synthnode-pg" else (None, None)
                sub = work / name
                sub.mkdir()
                proc, root = start_synthnode(sub, url, warm=name != "synthnode-lazy")
                try:
                    results.append(run_server(name, root, {"Authorization": f"Bearer {TOKEN}"},
                                              data, args))
                finally:
                    proc.terminate()
                    if drop is not None:
                        drop()
            else:
                orthanc = OrthancServer(work / "orthanc")
                orthanc.start()
                try:
                    results.append(run_server(name, orthanc.dicomweb_url, {}, data, args))
                finally:
                    orthanc.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = args.studies * args.slices
    print(f"\n{n} instances ({args.studies} studies x {args.slices} slices, {args.size}^2 CT), "
          f"{args.queries} QIDO searches, {args.frames} frame requests\n")
    cols = [("STOW-RS inst/s", "stow_inst_s", "{:.1f}"),
            ("QIDO median ms", "qido_median_ms", "{:.1f}"),
            ("QIDO p95 ms", "qido_p95_ms", "{:.1f}"),
            ("QIDO PatientName=P000x* median ms", "qido_PatientName_ms", "{:.1f}"),
            ("QIDO PatientName=P000x*: studies found, all searches", "qido_PatientName_found",
             "{:.0f}"),
            ("QIDO PatientID median ms", "qido_PatientID_ms", "{:.1f}"),
            ("QIDO PatientID: studies found", "qido_PatientID_found", "{:.0f}"),
            ("QIDO StudyDate range median ms", "qido_StudyDate_ms", "{:.1f}"),
            ("QIDO StudyDate range: studies found", "qido_StudyDate_found", "{:.0f}"),
            ("WADO series MB/s", "wado_mb_s", "{:.0f}"),
            ("series metadata, first read, median ms", "metadata_median_ms", "{:.1f}"),
            ("series metadata, second read, median ms", "metadata2_median_ms", "{:.1f}"),
            ("frame median ms", "frame_median_ms", "{:.1f}")]
    if args.rounds > 1:
        print("rounds: " + "; ".join(" then ".join(names) for names in order) + "\n")
    servers = list(dict.fromkeys(r["server"] for r in results))
    print("| measure | " + " | ".join(servers) + " |")
    print("|---|" + "---:|" * len(servers))
    for label, key, fmt in cols:
        cells = []
        for name in servers:
            xs = [r[key] for r in results if r["server"] == name]
            cell = fmt.format(statistics.median(xs))
            if len(xs) > 1:
                cell += f" ({fmt.format(min(xs))}-{fmt.format(max(xs))})"
            cells.append(cell)
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
