"""STOW-RS alone: a fresh ``synthnode serve`` per round (bench_dicomweb's configuration),
``--studies`` x 50 generated 512 px CT slices posted in requests of 10, one request at a
time; instances/s per round. For A/B runs of two versions of a file, swap the file between
rounds (each round starts a new server).

Usage (the probe behind bench/results/dicomweb.md run 9)::

    nice -n 10 python bench/stow_probe.py [--rounds 1] [--studies 10]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_dicomweb import CTYPE, TOKEN, make_data, start_synthnode
from tests.support.dicomweb import multipart


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--studies", type=int, default=10)
    args = ap.parse_args()
    data = make_data(args.studies, 50, 512)
    bodies = [multipart(files[k:k + 10]) for _, _, _, files in data
              for k in range(0, len(files), 10)]
    n = sum(len(files) for _, _, _, files in data)
    for r in range(args.rounds):
        work = Path(tempfile.mkdtemp(prefix="stow-probe-"))
        proc, root = start_synthnode(work)
        try:
            with httpx.Client(base_url=root, headers={"Authorization": f"Bearer {TOKEN}"},
                              timeout=300) as c:
                t0 = time.perf_counter()
                for b in bodies:
                    resp = c.post("/studies", content=b, headers={"Content-Type": CTYPE})
                    assert resp.status_code == 200, resp.text[:200]
                dt = time.perf_counter() - t0
            print(f"round {r}: {n / dt:.1f} inst/s", flush=True)
        finally:
            proc.terminate()
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
