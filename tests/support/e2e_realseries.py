"""Whole real series end to end (docs/realdata.md): DCMTK storescu -> a running node (shipped
models approved, quality gate on with its defaults) -> a real Orthanc, with
tests/support/e2e_real.py's harness. Used by tests/node/pipeline/test_e2e_realseries.py and
``bench/real_inputs.py --series``."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.support.e2e_real import Outcome, job_outcome
from tests.support.realseries import SERIES, read, realdata_dir


@dataclass(frozen=True)
class SeriesInput:
    """``count`` contiguous slices from ``start`` of a real series, as received (values,
    geometry, UIDs); ``others``: the series folder's other objects go with them (the CBCT's
    RT Structure Set); ``new_uids``: a copy under new study / series / instance UIDs (the
    same series sent again as another study), pixels and geometry untouched;
    ``fix_series_uid``: only the Series Instance UID replaced by a valid one (the Skyra
    series' UID has a component with a leading zero, which PS3.5 9.1 forbids);
    ``ingest_refused``: the node is expected to refuse every object at ingest."""

    name: str
    series: str
    start: int
    count: int
    calling_ae: str
    others: bool = False
    new_uids: bool = False
    fix_series_uid: bool = False
    ingest_refused: bool = False

    def datasets(self) -> list[Dataset]:
        dss = read(self.series, self.start, self.count, images_only=not self.others)
        if self.fix_series_uid:
            # deterministic: the same input every time it is read
            uid = generate_uid(entropy_srcs=[str(dss[0].SeriesInstanceUID)])
            for ds in dss:
                ds.SeriesInstanceUID = uid
        if not self.new_uids:
            return dss
        study, series = generate_uid(), generate_uid()
        out = []
        for ds in dss:
            ds = copy.deepcopy(ds)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            out.append(ds)
        return out


INPUTS = (
    # Varian OBI cone-beam head CT: 16 of 64 slices + the series' RT Structure Set
    SeriesInput("cbct-head-16", "cbct-head", 24, 16, "CBCT", others=True),
    # Siemens Skyra 3D GRE of the NIST phantom, as received: its Series Instance UID has a
    # component with a leading zero (...7.32.05.2...): refused at ingest, invalid_uid
    SeriesInput("mr-skyra-gre-as-received", "mr-skyra-gre", 120, 2, "MR_SKYRA",
                ingest_refused=True),
    # ... 16 of its 256 slices with only that UID made valid
    SeriesInput("mr-skyra-gre-16", "mr-skyra-gre", 120, 16, "MR_SKYRA", fix_series_uid=True),
    # the same phantom under a hold rule on Patient Name (a QA node's configuration)
    SeriesInput("mr-skyra-gre-qa-hold", "mr-skyra-gre", 120, 4, "MR_QA", new_uids=True),
    # Siemens MEMPRAGE, 6 sagittal 1 mm slices 9 mm apart (human)
    SeriesInput("mr-memprage-6", "mr-memprage", 0, 6, "MR_MEMPRAGE"),
)
TASKS: dict[str, list[dict[str, Any]]] = {
    "CBCT": [{"task": "ct_denoise", "output_format": "sc"}],
    "MR_SKYRA": [{"task": "mr_denoise", "output_format": "sc"}],
    "MR_MEMPRAGE": [{"task": "mr_denoise", "output_format": "sc"}],
    "MR_QA": [{"task": "mr_denoise", "output_format": "sc"}],
}
#: a hold rule for phantom / QA series on Patient Name (the documented Series Description /
#: Protocol Name rules do not match this phantom: both are "gre"); only for MR_QA, so the
#: same phantom from MR_SKYRA shows the node with the rule off
HOLD_RULES = ({"name": "qa-hold-patient", "match": {"calling_ae": "MR_QA",
                                                    "PatientName": r".*\bPHANTOM\b.*"}},)


def table(outcomes: list[Outcome]) -> str:
    """bench/RESULTS.md rows: series, source, vendor, transfer syntax, size, task, outcome,
    seconds."""
    rows = ["| input | series (package) | vendor / model | transfer syntax | size | task | "
            "outcome | seconds |", "|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        inp: SeriesInput = o.input
        ds = pydicom.dcmread(next(p for p in sorted(
            (realdata_dir() / inp.series).iterdir())
            if p.name != ".done" and p.name.split(".")[0] != "RS"), stop_before_pixels=True)
        size = f"{ds.Rows}x{ds.Columns}x{inp.count}" + (" + RT Struct" if inp.others else "")
        vendor = f"{ds.get('Manufacturer', '-')} {ds.get('ManufacturerModelName', '')}".strip()
        jobs = o.jobs or [{"task": TASKS[inp.calling_ae][0]["task"],
                           "state": "refused at ingest" if inp.ingest_refused
                           else "held by rule", "error": None, "result": {}}]
        for j in jobs:
            if j["state"] == "refused at ingest":
                what = ("refused at ingest: invalid_uid (Series Instance UID component with a "
                        "leading zero)")
            elif j["state"] == "held by rule":
                what = f"held by rule {HOLD_RULES[0]['name']!r} (Patient Name)"
            else:
                what = job_outcome(j)
                if j["state"] != "failed" and o.delivered:
                    what += ": delivered"
            rows.append(f"| {inp.name} | {inp.series} ({SERIES[inp.series].source.split()[0]}) | "
                        f"{vendor} | {ds.file_meta.TransferSyntaxUID.name} | {size} | "
                        f"{j['task']} | {what[:90]} | {o.seconds:.1f} |")
    return "\n".join(rows)
