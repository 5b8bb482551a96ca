"""Real inputs end to end: the table of bench/RESULTS.md ("Real scans end to end").

Runs tests/support/e2e_real.py's harness (DCMTK storescu -> node with the shipped models and
the quality gate on -> a real Orthanc, one node session, each input its own study) and prints
one row per input and task: file, vendor, transfer syntax, size, task, outcome, seconds (from
the storescu start to every job of the study finished: quiet period 2 s, engine, gate, build,
watermark, store, dispatch).

    nice -n 10 python bench/real_inputs.py [--json out.json]

With ``--series``: the whole real series of docs/realdata.md instead (fetched by
scripts/fetch-realdata; tests/support/e2e_realseries.py, the harness of
tests/node/pipeline/test_e2e_realseries.py): 16 of 64 slices of the Varian OBI cone-beam CT
(+ its RT Structure Set) with ct_denoise; the Siemens Skyra GRE phantom as received (refused
at ingest), with its Series Instance UID made valid (16 of 256 slices, mr_denoise), and under
a hold rule on Patient Name; 6 sagittal slices of a Siemens MEMPRAGE with mr_denoise.

    nice -n 10 python bench/real_inputs.py --series [--json out.json]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import e2e_realseries as series
from tests.support.e2e_real import dump, run_real_inputs, table
from tests.support.orthanc import OrthancServer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write the outcomes as JSON")
    ap.add_argument("--series", action="store_true",
                    help="the whole real series of docs/realdata.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        orthanc = OrthancServer(Path(tmp) / "orthanc")
        orthanc.start()
        try:
            if args.series:
                outcomes, _ = run_real_inputs(Path(tmp) / "run", orthanc, series.INPUTS,
                                              tasks=series.TASKS, hold_rules=series.HOLD_RULES)
            else:
                outcomes, _ = run_real_inputs(Path(tmp) / "run", orthanc)
        finally:
            orthanc.stop()
    print(series.table(outcomes) if args.series else table(outcomes))
    if args.json:
        dump(outcomes, args.json)


if __name__ == "__main__":
    main()
