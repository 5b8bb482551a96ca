"""Ledger benchmark: appends/s (single, threads, processes; SQLite and PostgreSQL),
``audit verify`` time at 100 k and 1 M entries, inclusion-proof latency at 1 M entries.

Usage::

    nice -n 10 python bench/bench_ledger.py appends --backend sqlite [--n 2000]
    nice -n 10 python bench/bench_ledger.py appends --backend postgresql
    nice -n 10 python bench/bench_ledger.py scale --sizes 100000 1000000

PostgreSQL: ``$SYNTHNODE_TEST_PG`` (default postgresql+psycopg://postgres@127.0.0.1:5432/test);
a scratch database is created and dropped. Results print as Markdown table rows.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audit import merkle  # noqa: E402
from audit.checkpoint import Verifier, load_or_create_key  # noqa: E402
from audit.events import Event, EventType  # noqa: E402
from audit.ledger import Ledger  # noqa: E402
from audit.verify import verify_database  # noqa: E402
from node.db import make_engine, upgrade  # noqa: E402

PG_ADMIN = os.environ.get("SYNTHNODE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def event(i: int) -> Event:
    """A realistic instance.received event (~400 bytes of canonical JSON)."""
    study = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    return Event(EventType.INSTANCE_RECEIVED, "ae:CT_SCANNER_01",
                 subject={"study_uid": study, "series_uid": f"{study}.{i // 200}",
                          "sop_uid": f"{study}.{i // 200}.{i}", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2"},
                 payload={"sha256": f"{i:064x}", "calling_ae": "CT_SCANNER_01", "called_ae": "SYNTHNODE",
                          "transfer_syntax_uid": "1.2.840.10008.1.2.1"})


class Db:
    def __init__(self, backend: str, tmp: Path) -> None:
        self.backend = backend
        self.name = None
        if backend == "sqlite":
            self.url = f"sqlite:///{tmp / f'bench-{uuid.uuid4().hex[:6]}.db'}"
        else:
            import psycopg

            self.name = f"bench_{uuid.uuid4().hex[:10]}"
            with psycopg.connect(PG_ADMIN.replace("+psycopg", ""), autocommit=True) as c:
                c.execute(f'CREATE DATABASE "{self.name}"')
            self.url = f"{PG_ADMIN.rsplit('/', 1)[0]}/{self.name}"
        upgrade(self.url)

    def drop(self) -> None:
        if self.name:
            import psycopg

            with psycopg.connect(PG_ADMIN.replace("+psycopg", ""), autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def _proc(url: str, n: int, start: int, q: "mp.Queue[float]") -> None:
    ledger = Ledger(make_engine(url))
    q.put(time.perf_counter())
    for i in range(n):
        ledger.append(event(start + i))
    q.put(time.perf_counter())


def bench_appends(backend: str, n: int, workers: int) -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory() as td:
        # single writer, one transaction per append
        db = Db(backend, Path(td))
        try:
            ledger = Ledger(make_engine(db.url))
            t0 = time.perf_counter()
            for i in range(n):
                ledger.append(event(i))
            dt = time.perf_counter() - t0
            rows.append(f"| {backend} | single writer, 1 event / transaction | {n} | {n / dt:,.0f} |")
            # batched: 100 events / transaction (append_many)
            t0 = time.perf_counter()
            for b in range(0, n * 5, 100):
                ledger.append_many([event(n + b + j) for j in range(100)])
            dt = time.perf_counter() - t0
            rows.append(f"| {backend} | single writer, append_many 100 / transaction | {n * 5} | {n * 5 / dt:,.0f} |")
            # threads
            per = n // workers
            t0 = time.perf_counter()
            ths = [threading.Thread(target=lambda k=k: [ledger.append(event(10**7 + k * per + i)) for i in range(per)])
                   for k in range(workers)]
            for t in ths:
                t.start()
            for t in ths:
                t.join()
            dt = time.perf_counter() - t0
            rows.append(f"| {backend} | {workers} threads, 1 event / transaction | {per * workers} | {per * workers / dt:,.0f} |")
            # processes
            ctx = mp.get_context("spawn")
            q: mp.Queue[float] = ctx.Queue()
            ps = [ctx.Process(target=_proc, args=(db.url, per, 2 * 10**7 + k * per, q)) for k in range(workers)]
            for p in ps:
                p.start()
            stamps = [q.get() for _ in range(2 * workers)]
            for p in ps:
                p.join()
            dt = max(stamps) - min(stamps)  # from the first process ready to the last done
            rows.append(f"| {backend} | {workers} processes, 1 event / transaction | {per * workers} | {per * workers / dt:,.0f} |")
            size = ledger.size()
            key = load_or_create_key(Path(td) / "k")
            rep = verify_database(ledger.engine, Verifier("bench/ledger", key.public_key()))
            assert rep.ok and rep.size == size, rep.problems
        finally:
            db.drop()
    return rows


def fill(ledger: Ledger, n: int, batch: int = 20000) -> float:
    t0 = time.perf_counter()
    done = ledger.size()
    while done < n:
        k = min(batch, n - done)
        ledger.append_many([event(done + i) for i in range(k)])
        done += k
    return time.perf_counter() - t0


def bench_scale(sizes: list[int], proofs: int, keep: Path | None) -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory() as td:
        base = keep or Path(td)
        url = f"sqlite:///{base / 'scale.db'}"
        upgrade(url)
        ledger = Ledger(make_engine(url))
        key = load_or_create_key(base / "k") if not (base / "k").exists() else load_or_create_key(base / "k")
        verifier = Verifier("bench/ledger", key.public_key())
        for n in sorted(sizes):
            tf = fill(ledger, n)
            rep = verify_database(ledger.engine, verifier)
            assert rep.ok and rep.size == n, rep.problems[:3]
            lat = []
            rng = random.Random(1)
            root = ledger.root(n)
            for _ in range(proofs):
                s = rng.randrange(n)
                t0 = time.perf_counter()
                proof = ledger.inclusion_proof(s, n)
                lat.append(time.perf_counter() - t0)
                merkle.verify_inclusion(s, n, ledger.entry(s).leaf_hash, proof, root)
            lat.sort()
            clat = []
            for _ in range(min(proofs, 200)):
                a = rng.randrange(1, n)
                t0 = time.perf_counter()
                ledger.consistency_proof(a, n)
                clat.append(time.perf_counter() - t0)
            clat.sort()
            rows.append(f"| {n:,} | fill {tf:.1f} s | verify {rep.elapsed_s:.2f} s | inclusion proof "
                        f"p50 {statistics.median(lat) * 1e3:.2f} ms, p99 {lat[int(len(lat) * 0.99) - 1] * 1e3:.2f} ms "
                        f"| consistency proof p50 {statistics.median(clat) * 1e3:.2f} ms |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("appends")
    a.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    a.add_argument("--n", type=int, default=2000)
    a.add_argument("--workers", type=int, default=4)
    s = sub.add_parser("scale")
    s.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    s.add_argument("--proofs", type=int, default=1000)
    s.add_argument("--keep", type=Path, help="keep the database in this folder")
    v = sub.add_parser("verify", help="time verify + proofs on an existing database")
    v.add_argument("--db", required=True)
    v.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.cmd == "appends":
        print("| backend | mode | events | appends/s |\n|---|---|---|---|")
        for r in bench_appends(args.backend, args.n, args.workers):
            print(r, flush=True)
    elif args.cmd == "verify":
        ledger = Ledger(make_engine(args.db))
        key = load_or_create_key(Path(tempfile.mkdtemp()) / "k")
        verifier = Verifier("bench/ledger", key.public_key())
        times = []
        cpu = []
        for _ in range(args.repeat):
            c0 = time.process_time()
            rep = verify_database(ledger.engine, verifier)
            cpu.append(time.process_time() - c0)
            assert rep.ok, rep.problems[:3]
            times.append(rep.elapsed_s)
        n = rep.size
        rng = random.Random(2)
        lat = []
        for _ in range(1000):
            s_ = rng.randrange(n)
            t0 = time.perf_counter()
            ledger.inclusion_proof(s_, n)
            lat.append(time.perf_counter() - t0)
        lat.sort()
        print(f"| {n:,} | verify min {min(times):.2f} s / median {statistics.median(times):.2f} s "
              f"({args.repeat} runs), CPU time min {min(cpu):.2f} s | inclusion proof p50 {lat[500] * 1e3:.2f} ms, p99 {lat[989] * 1e3:.2f} ms |")
    else:
        print("| entries | fill | verify | inclusion proof | consistency proof |\n|---|---|---|---|---|")
        bench_scale(args.sizes, args.proofs, args.keep)


if __name__ == "__main__":
    main()
