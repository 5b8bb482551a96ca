"""What the console's background verification costs against ``synthnode audit verify``:
``verify_database`` on one SQLite ledger with the CLI's batch (50,000 entries, no progress)
and with the console's (``node.console.verification.BATCH`` entries per progress step, a
progress callback each step). Best of ``--repeat`` runs each.

Usage::

    nice -n 10 python bench/bench_verify_progress.py --n 200000 --repeat 3
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audit.checkpoint import Verifier, load_or_create_key
from audit.ledger import Ledger
from audit.verify import verify_database
from bench.bench_ledger import fill
from node.console.verification import BATCH
from node.db import make_engine, upgrade


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        url = f"sqlite:///{Path(td) / 'ledger.db'}"
        upgrade(url)
        ledger = Ledger(make_engine(url))
        tf = fill(ledger, a.n)
        verifier = Verifier("bench/ledger", load_or_create_key(Path(td) / "k").public_key())
        steps: list[int] = []
        cli, console = [], []
        for _ in range(a.repeat):
            rep = verify_database(ledger.engine, verifier)
            assert rep.ok and rep.size == a.n
            cli.append(rep.elapsed_s)
            steps.clear()
            rep = verify_database(ledger.engine, verifier, batch=BATCH,
                                  progress=lambda phase, done, total: steps.append(done))
            assert rep.ok and rep.size == a.n and steps[-1] == a.n
            console.append(rep.elapsed_s)
        print(f"| {a.n:,} entries (fill {tf:.1f} s) | CLI batch 50,000: {min(cli):.2f} s | "
              f"console batch {BATCH:,} with progress ({len(steps)} steps): "
              f"{min(console):.2f} s | ratio {min(console) / min(cli):.2f} |")


if __name__ == "__main__":
    main()
