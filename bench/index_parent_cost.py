"""What the index spends on a new series, in process on a fresh SQLite index: 1,000
``Index.add_instance`` calls of one series (the cached path) and 1,000 each opening a new
patient / study / series (the parent rows); then ``Index.owners`` (the ingest's owner
check) on a new connection and inside a transaction.

Usage (the in-process figures of bench/results/ingest.md "Fourth session")::

    python bench/index_parent_cost.py [--n 1000]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.db import make_engine, upgrade
from storage.index import Index, InstanceRecord


def record(i: int, new_series: bool) -> InstanceRecord:
    s = i if new_series else 0
    return InstanceRecord(
        sop_instance_uid=f"1.2.3.{i}.{int(new_series)}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_instance_uid=f"1.2.4.{s}",
        study_instance_uid=f"1.2.5.{s}", transfer_syntax_uid="1.2.840.10008.1.2.1",
        file_path=f"x/{i}.{int(new_series)}", file_size=1, sha256="0" * 64,
        patient_id=f"P{s}", patient_name="A^B", study_date="20200101", modality="CT",
        series_number=1, instance_number=i)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    n = ap.parse_args().n
    with tempfile.TemporaryDirectory() as d:
        url = f"sqlite:///{d}/index.db"
        upgrade(url)
        engine = make_engine(url)
        idx = Index(engine)
        for new in (False, True):
            with engine.begin() as conn:
                t = time.perf_counter()
                for i in range(n):
                    idx.add_instance(conn, record(i, new))
                dt = time.perf_counter() - t
            print(f"add_instance, {'a new series each' if new else 'one series'}: "
                  f"{dt / n * 1e6:.0f} us")
        t = time.perf_counter()
        for i in range(n):
            idx.owners(f"1.2.5.{i}", f"1.2.4.{i}")
        print(f"owners() on a new connection: {(time.perf_counter() - t) / n * 1e6:.0f} us")
        with engine.begin() as conn:
            t = time.perf_counter()
            for i in range(n):
                idx.owners(f"1.2.5.{i}", f"1.2.4.{i}", conn)
            print(f"owners() in a transaction: {(time.perf_counter() - t) / n * 1e6:.0f} us")
        engine.dispose()


if __name__ == "__main__":
    main()
