"""QIDO-RS on a large index: ``--instances`` index rows (default 100,000) written straight
into a freshly migrated database (SQLite and / or PostgreSQL) with the index's own tables
(storage.tables; no files: QIDO-RS reads only the index), then ``synthnode serve`` on it
and QIDO-RS searches at the study, series and instance levels over HTTP (httpx, one
connection, sequential), median and p95 per search; plus each search's query plan
(SQLite ``EXPLAIN QUERY PLAN`` / PostgreSQL ``EXPLAIN``) with any full scan of a large
table (studies, series, instances) named.

With ``--orthanc``, the same patients, studies, series and instances are written as small
Part 10 files (the index's attributes, no pixel data), stored into a fresh Orthanc (Debian
``orthanc`` + ``orthanc-dicomweb``, its SQLite index) with DCMTK ``storescu`` on 4
associations, and the same searches are sent to its DICOMweb plugin by the same client,
in the same run (Orthanc first, then synthnode on each database).

Shape: ``--per-series`` instances per series, 2 series per study (CT + MR), 2 studies per
patient, study dates spread over 2015-2024.

Usage (exact command behind bench/results/dicomweb.md "QIDO-RS on 100,000 instances")::

    nice -n 10 python bench/bench_qido_index.py --instances 100000 --repeat 30 \\
        [--dbs sqlite pg] [--plans-only] [--orthanc]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import statistics
import subprocess
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

from bench.bench_ingest import dcmtk
from node.db import make_engine, upgrade
from node.dicomweb import qido
from storage.matching import QueryLevel, run
from storage.tables import Instance, Patient, Series, Study
from tests.support.dimse import NodeProcess, node_settings_dict
from tests.support.net import get_port, wait_for
from tests.support.orthanc import OrthancServer

TOKEN = "bench-token"
ROOT = "1.2.826.0.1.3680043.10.1234"
BIG = ("studies", "series", "instances")


def study_uid(i: int) -> str:
    return f"{ROOT}.1.{i}"


def series_uid(i: int, k: int) -> str:
    return f"{ROOT}.2.{i}.{k}"


def shape(instances: int, per_series: int) -> dict[str, list[dict[str, Any]]]:
    """The rows of every table (patients, studies, series, instances), keyed by table."""
    n_studies = max(1, instances // (2 * per_series))
    now = datetime.now(UTC)
    rows: dict[str, list[dict[str, Any]]] = {"patients": [], "studies": [], "series": [],
                                             "instances": []}
    for p in range(n_studies // 2 + 1):
        rows["patients"].append({
            "id": p + 1, "patient_id": f"ID{p:06d}", "issuer_of_patient_id": "",
            "patient_name": f"PAT{p:05d}^NAME{p % 97}",
            "patient_birth_date": f"19{50 + p % 50}0101", "patient_sex": "MF"[p % 2]})
    for i in range(n_studies):
        day = i * 3653 // n_studies
        date = datetime.fromordinal(datetime(2015, 1, 1).toordinal() + day).strftime("%Y%m%d")
        rows["studies"].append({
            "id": i + 1, "study_instance_uid": study_uid(i), "patient_pk": i // 2 + 1,
            "study_date": date, "study_time": "120000", "accession_number": f"A{i:07d}",
            "study_id": str(i), "study_description": "bench", "created_at": now,
            "updated_at": now})
    for i in range(n_studies):
        for k, mod in enumerate(("CT", "MR")):
            rows["series"].append({
                "id": 2 * i + k + 1, "series_instance_uid": series_uid(i, k), "study_pk": i + 1,
                "modality": mod, "series_number": k + 1, "series_description": f"{mod} bench",
                "synthetic": False, "created_at": now, "updated_at": now})
    pk = 0
    for s in range(2 * n_studies):
        i, k = divmod(s, 2)
        for j in range(per_series):
            pk += 1
            sop = f"{ROOT}.3.{i}.{k}.{j}"
            rows["instances"].append({
                "id": pk, "sop_instance_uid": sop, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                "series_pk": s + 1, "instance_number": j + 1,
                "transfer_syntax_uid": "1.2.840.10008.1.2.1", "number_of_frames": None,
                "rows": 512, "columns": 512, "bits_allocated": 16, "file_path": f"x/{sop}.dcm",
                "file_size": 525000, "sha256": hashlib.sha256(sop.encode()).hexdigest(),
                "received_at": now, "source": "stow"})
    return rows


def fill(engine: Engine, rows: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """Write the index rows; returns the counts."""
    with engine.begin() as conn:
        for name, table in (("patients", Patient), ("studies", Study), ("series", Series),
                            ("instances", Instance)):
            for k in range(0, len(rows[name]), 10000):
                conn.execute(insert(table), rows[name][k:k + 10000])
    return {name: len(r) for name, r in rows.items()}


def write_files(rows: dict[str, list[dict[str, Any]]], out: Path, parts: int) -> list[Path]:
    """One small Part 10 file per instance row (its patient / study / series / instance
    attributes, no pixel data), spread over ``parts`` folders; returns the folders."""
    from pydicom import dcmwrite
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    patients = {p["id"]: p for p in rows["patients"]}
    studies = {s["id"]: s for s in rows["studies"]}
    series = {s["id"]: s for s in rows["series"]}
    dirs = [out / f"part{k}" for k in range(parts)]
    for d in dirs:
        d.mkdir(parents=True)
    for n, inst in enumerate(rows["instances"]):
        se = series[inst["series_pk"]]
        st = studies[se["study_pk"]]
        pa = patients[st["patient_pk"]]
        ds = Dataset()
        ds.SOPClassUID = inst["sop_class_uid"]
        ds.SOPInstanceUID = inst["sop_instance_uid"]
        ds.StudyDate, ds.StudyTime = st["study_date"], st["study_time"]
        ds.AccessionNumber = st["accession_number"]
        ds.Modality = se["modality"]
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = st["study_description"]
        ds.SeriesDescription = se["series_description"]
        ds.PatientName, ds.PatientID = pa["patient_name"], pa["patient_id"]
        ds.PatientBirthDate, ds.PatientSex = pa["patient_birth_date"], pa["patient_sex"]
        ds.StudyInstanceUID = st["study_instance_uid"]
        ds.SeriesInstanceUID = se["series_instance_uid"]
        ds.StudyID = st["study_id"]
        ds.SeriesNumber = se["series_number"]
        ds.InstanceNumber = inst["instance_number"]
        ds.Rows, ds.Columns, ds.BitsAllocated = inst["rows"], inst["columns"], 16
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        dcmwrite(dirs[n % parts] / f"{n}.dcm", ds, enforce_file_format=True)
    return dirs


def fill_orthanc(rows: dict[str, list[dict[str, Any]]], work: Path) -> OrthancServer:
    """A fresh Orthanc holding the same instances (sent with storescu on 4 associations)."""
    t = time.perf_counter()
    dirs = write_files(rows, work / "files", 4)
    print(f"\n## orthanc: {len(rows['instances']):,} files written in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    # the fill's speed is not measured: no fsync per instance, no compression; DCMTK (also
    # Orthanc's DICOM layer) leaves Nagle's algorithm on unless TCP_NODELAY is set (40 ms
    # per C-STORE waiting for a delayed ACK)
    os.environ["TCP_NODELAY"] = "1"
    orthanc = OrthancServer(work / "orthanc", extra_config={
        "SyncStorageArea": False, "StorageCompression": False})
    orthanc.start()
    t = time.perf_counter()
    exe = dcmtk("storescu")
    procs = [subprocess.Popen([exe, "-aec", "ORTHANC", "+sd", "+r", "127.0.0.1",
                               str(orthanc.dicom_port), str(d)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for d in dirs]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-800:]}")
    stats = orthanc.get("/statistics")
    assert isinstance(stats, dict)
    print(f"   stored in {time.perf_counter() - t:.1f} s: {stats['CountInstances']:,} "
          f"instances, {stats['CountStudies']:,} studies", flush=True)
    shutil.rmtree(work / "files", ignore_errors=True)
    return orthanc


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


def measure(root: str, cases: list[Any], repeat: int,
            token: str | None = TOKEN) -> list[tuple[str, int, float, float]]:
    out = []
    headers = {"Accept": "application/dicom+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    with httpx.Client(base_url=root, headers=headers, timeout=120) as c:
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
    ap.add_argument("--orthanc", action="store_true",
                    help="the same searches on Orthanc's DICOMweb plugin holding the same data")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-qido-"))
    rows = shape(args.instances, args.per_series)
    cases = searches(len(rows["studies"]))
    results: dict[str, list[tuple[str, int, float, float]]] = {}
    try:
        if args.orthanc and not args.plans_only:
            orthanc = fill_orthanc(rows, work)
            try:
                results["Orthanc"] = measure(orthanc.dicomweb_url, cases, args.repeat, None)
            finally:
                orthanc.stop()
            shutil.rmtree(work / "orthanc", ignore_errors=True)
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
                counts = fill(engine, rows)
                with engine.begin() as conn:
                    conn.execute(text("ANALYZE"))  # the statistics a running index has
                print(f"\n## {db}: {counts} written in {time.perf_counter() - t:.1f} s")
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
                    results[f"synthnode {db}"] = measure(root, cases, args.repeat)
                finally:
                    proc.terminate()
            finally:
                if drop is not None:
                    drop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not results:
        return
    names = list(results)
    print(f"\n| search ({len(rows['instances']):,} instances) | matches | "
          + " | ".join(f"{n} median / p95 ms" for n in names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for k, (label, *_rest) in enumerate(cases):
        seen = {n: results[n][k][1] for n in names}
        matches = (str(seen[names[0]]) if len(set(seen.values())) == 1 else
                   ", ".join(f"{n}: {c}" for n, c in seen.items()))
        cells = " | ".join(f"{results[n][k][2]:.1f} / {results[n][k][3]:.1f}" for n in names)
        print(f"| {label} | {matches} | {cells} |")


if __name__ == "__main__":
    main()
