"""QIDO-RS on a large index: ``--instances`` index rows (default 100,000) written straight
into a freshly migrated database (SQLite and / or PostgreSQL) with the index's own tables
(storage.tables; no files: QIDO-RS reads only the index), then ``synthnode serve`` on it
and QIDO-RS searches at the study, series and instance levels over HTTP (httpx, one
connection, sequential), median and p95 per search; plus each search's query plan
(SQLite ``EXPLAIN QUERY PLAN`` / PostgreSQL ``EXPLAIN``) with any full scan of a large
table (studies, series, instances) named.

Shape: ``--per-series`` instances per series, 2 series per study (CT + MR), 2 studies per
patient, study dates spread over 2015-2024.

Usage (exact command behind bench/results/dicomweb.md "QIDO-RS on 100,000 instances")::

    nice -n 10 python bench/bench_qido_index.py --instances 100000 --repeat 30 \\
        [--dbs sqlite pg] [--plans-only]
"""
from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import tomli_w
from sqlalchemy import Engine, insert, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.db import make_engine, upgrade
from node.dicomweb import qido
from storage.matching import QueryLevel, run
from storage.tables import Instance, Patient, Series, Study
from tests.support.dimse import NodeProcess, node_settings_dict
from tests.support.net import get_port, wait_for

TOKEN = "bench-token"
ROOT = "1.2.826.0.1.3680043.10.1234"
BIG = ("studies", "series", "instances")


def study_uid(i: int) -> str:
    return f"{ROOT}.1.{i}"


def series_uid(i: int, k: int) -> str:
    return f"{ROOT}.2.{i}.{k}"


def fill(engine: Engine, instances: int, per_series: int) -> dict[str, int]:
    """Write the index rows; returns the counts."""
    n_studies = max(1, instances // (2 * per_series))
    now = datetime.now(UTC)
    chunk: list[dict[str, Any]] = []

    def flush(table: Any, conn: Any) -> None:
        if chunk:
            conn.execute(insert(table), chunk)
            chunk.clear()

    with engine.begin() as conn:
        for p in range(n_studies // 2 + 1):
            chunk.append({"id": p + 1, "patient_id": f"ID{p:06d}", "issuer_of_patient_id": "",
                          "patient_name": f"PAT{p:05d}^NAME{p % 97}",
                          "patient_birth_date": f"19{50 + p % 50}0101", "patient_sex": "MF"[p % 2]})
        flush(Patient, conn)
        for i in range(n_studies):
            day = i * 3653 // n_studies
            date = datetime.fromordinal(datetime(2015, 1, 1).toordinal() + day).strftime("%Y%m%d")
            chunk.append({"id": i + 1, "study_instance_uid": study_uid(i), "patient_pk": i // 2 + 1,
                          "study_date": date, "study_time": "120000",
                          "accession_number": f"A{i:07d}", "study_id": str(i),
                          "study_description": "bench", "created_at": now, "updated_at": now})
        flush(Study, conn)
        for i in range(n_studies):
            for k, mod in enumerate(("CT", "MR")):
                chunk.append({"id": 2 * i + k + 1, "series_instance_uid": series_uid(i, k),
                              "study_pk": i + 1, "modality": mod, "series_number": k + 1,
                              "series_description": f"{mod} bench", "synthetic": False,
                              "created_at": now, "updated_at": now})
        flush(Series, conn)
        pk = 0
        for s in range(2 * n_studies):
            i, k = divmod(s, 2)
            for j in range(per_series):
                pk += 1
                sop = f"{ROOT}.3.{i}.{k}.{j}"
                chunk.append({"id": pk, "sop_instance_uid": sop,
                              "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "series_pk": s + 1,
                              "instance_number": j + 1,
                              "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                              "number_of_frames": None, "rows": 512, "columns": 512,
                              "bits_allocated": 16, "file_path": f"x/{sop}.dcm",
                              "file_size": 525000,
                              "sha256": hashlib.sha256(sop.encode()).hexdigest(),
                              "received_at": now, "source": "stow"})
                if len(chunk) >= 10000:
                    flush(Instance, conn)
        flush(Instance, conn)
    return {"patients": n_studies // 2 + 1, "studies": n_studies, "series": 2 * n_studies,
            "instances": pk}


def searches(n_studies: int) -> list[tuple[str, str, QueryLevel, dict[str, str], bool]]:
    """(label, path, level, params, across) of each measured search."""
    mid = n_studies // 2
    uids = ",".join(study_uid(mid + 7 * j) for j in range(10))
    return [
        ("studies PatientName=PAT0012*", "/studies", QueryLevel.STUDY,
         {"PatientName": "PAT0012*"}, False),
        ("studies PatientID=ID000345", "/studies", QueryLevel.STUDY,
         {"PatientID": "ID000345"}, False),
        ("studies StudyDate=20200301-20200331", "/studies", QueryLevel.STUDY,
         {"StudyDate": "20200301-20200331"}, False),
        ("studies StudyInstanceUID=list of 10", "/studies", QueryLevel.STUDY,
         {"StudyInstanceUID": uids}, False),
        ("studies limit=25 offset=1000", "/studies", QueryLevel.STUDY,
         {"limit": "25", "offset": "1000"}, False),
        ("studies ModalitiesInStudy=MR, StudyDate=2023", "/studies", QueryLevel.STUDY,
         {"ModalitiesInStudy": "MR", "StudyDate": "20230101-20231231", "limit": "100"}, False),
        ("series Modality=CT StudyDate=20200301-20200331", "/series", QueryLevel.SERIES,
         {"Modality": "CT", "StudyDate": "20200301-20200331"}, True),
        ("studies/{uid}/series", f"/studies/{study_uid(mid)}/series", QueryLevel.SERIES,
         {}, False),
        ("studies/{uid}/series/{uid}/instances",
         f"/studies/{study_uid(mid)}/series/{series_uid(mid, 0)}/instances",
         QueryLevel.IMAGE, {}, False),
        ("instances SOPInstanceUID=one", "/instances", QueryLevel.IMAGE,
         {"SOPInstanceUID": f"{ROOT}.3.{mid}.1.7"}, True),
        ("instances PatientID=ID000345 limit=100", "/instances", QueryLevel.IMAGE,
         {"PatientID": "ID000345", "limit": "100"}, True),
    ]


def _path_keys(path: str) -> dict[str, str]:
    parts = path.strip("/").split("/")
    keys = {}
    if len(parts) >= 2 and parts[0] == "studies":
        keys["StudyInstanceUID"] = parts[1]
    if len(parts) >= 4 and parts[2] == "series":
        keys["SeriesInstanceUID"] = parts[3]
    return keys


def sql_ms(engine: Engine, level: QueryLevel, params: dict[str, str], path: str,
           across: bool, repeat: int) -> float:
    """Median ms of the search's index query alone (execute + fetch every row + the
    ModalitiesInStudy look-ups), as the server runs it."""
    req = qido.parse_qido(level, list(params.items()), _path_keys(path), across)
    query = qido.build(req)
    lat = []
    with engine.connect() as conn:
        for _ in range(repeat):
            t = time.perf_counter()
            list(run(conn, query))
            lat.append(time.perf_counter() - t)
    return statistics.median(lat) * 1000


def plan(engine: Engine, level: QueryLevel, params: dict[str, str], path: str,
         across: bool) -> tuple[str, list[str]]:
    """The query plan of a search and the large tables it scans in full."""
    req = qido.parse_qido(level, list(params.items()), _path_keys(path), across)
    stmt = qido.build(req).statement
    sql = str(stmt.compile(engine, compile_kwargs={"literal_binds": True}))
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.execute(text("EXPLAIN QUERY PLAN " + sql)).all()
            # "SCAN t" reads every row; "SCAN t USING INDEX" / "SEARCH t" do not
            lines = [r[-1] for r in rows]
            scans = [t for t in BIG for ln in lines
                     if re.match(rf"SCAN {t}\b(?! USING)", ln) and "INDEX" not in ln]
        else:
            lines = [r[0] for r in conn.execute(text("EXPLAIN " + sql)).all()]
            scans = [t for t in BIG for ln in lines if re.search(rf"Seq Scan on {t}\b", ln)]
    return "\n".join(lines), sorted(set(scans))


def start_node(work: Path, url: str) -> tuple[NodeProcess, str]:
    data_dir = work / "node"
    data_dir.mkdir(exist_ok=True)
    port = get_port()
    web = {"enabled": True, "port": get_port(), "access_flush_s": 1.0, "metadata_warm": False,
           "tokens": [{"name": "bench", "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                       "scopes": ["read"]}]}
    settings = node_settings_dict(data_dir, port, dicomweb=web, log_level="WARNING",
                                  database={"url": url})
    cfg = work / "node.toml"
    cfg.write_bytes(tomli_w.dumps(settings).encode())
    proc = NodeProcess(config=cfg, data_dir=data_dir, port=port, log=work / "node.log").start()
    m = wait_for(lambda: re.search(r"DICOMweb (\S+)/studies", proc.output()), 60, "DICOMweb")
    assert isinstance(m, re.Match)
    return proc, m.group(1)


def measure(root: str, cases: list[Any], repeat: int) -> list[tuple[str, int, float, float]]:
    out = []
    with httpx.Client(base_url=root, headers={"Authorization": f"Bearer {TOKEN}",
                                              "Accept": "application/dicom+json"},
                      timeout=120) as c:
        for label, path, _, params, _ in cases:
            lat = []
            n = 0
            for _ in range(repeat):
                t = time.perf_counter()
                r = c.get(path, params=params)
                r.raise_for_status()
                lat.append(time.perf_counter() - t)
                n = len(r.json())
            lat.sort()
            out.append((label, n, statistics.median(lat) * 1000,
                        lat[min(len(lat) - 1, int(0.95 * len(lat)))] * 1000))
    return out


def pg_database(admin: str) -> tuple[str, Any]:
    import uuid

    import psycopg

    name = f"sn_qido_{uuid.uuid4().hex[:10]}"
    plain = admin.replace("+psycopg", "")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return f"{admin.rsplit('/', 1)[0]}/{name}", drop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instances", type=int, default=100_000)
    ap.add_argument("--per-series", type=int, default=25)
    ap.add_argument("--repeat", type=int, default=30, help="runs of each search")
    ap.add_argument("--dbs", nargs="+", default=["sqlite", "pg"])
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--plans-only", action="store_true", help="no server, plans only")
    ap.add_argument("--show-plans", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-qido-"))
    try:
        for db in args.dbs:
            drop = None
            if db == "pg":
                url, drop = pg_database(args.pg)
            else:
                url = f"sqlite:///{work / 'index.db'}"
            try:
                upgrade(url)
                engine = make_engine(url)
                t = time.perf_counter()
                counts = fill(engine, args.instances, args.per_series)
                with engine.begin() as conn:
                    conn.execute(text("ANALYZE"))  # the statistics a running index has
                print(f"\n## {db}: {counts} written in {time.perf_counter() - t:.1f} s")
                cases = searches(counts["studies"])
                print("\n| search | large tables scanned in full | index query alone, "
                      "median ms |")
                print("|---|---|---:|")
                sql: dict[str, float] = {}
                for label, path, level, params, across in cases:
                    p, scans = plan(engine, level, params, path, across)
                    sql[label] = sql_ms(engine, level, params, path, across, args.repeat)
                    print(f"| {label} | {', '.join(scans) or '-'} | {sql[label]:.2f} |")
                    if args.show_plans:
                        print(p)
                engine.dispose()
                if args.plans_only:
                    continue
                sub = work / f"node-{db}"
                sub.mkdir()
                proc, root = start_node(sub, url)
                try:
                    rows = measure(root, cases, args.repeat)
                finally:
                    proc.terminate()
                print(f"\n| search ({db}, {counts['instances']:,} instances) | matches "
                      "| median ms | p95 ms |")
                print("|---|---:|---:|---:|")
                for label, n, med, p95 in rows:
                    print(f"| {label} | {n} | {med:.1f} | {p95:.1f} |")
            finally:
                if drop is not None:
                    drop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
