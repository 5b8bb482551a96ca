"""Real inputs end to end: DCMTK storescu -> a running node (shipped models approved, quality
gate on with its defaults) -> a real Orthanc. One node session for every input; each input
is its own study. Used by tests/node/pipeline/test_e2e_real.py and bench/real_inputs.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pydicom
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from tests.support.realdata import series_from_real_slice

WEIGHTS = Path(__file__).resolve().parents[2] / "engine" / "weights"
MODELS = ("ct-denoise-wreg", "ct-to-mr-wreg", "mr-denoise-wreg")


class Input(Protocol):
    """What the harness sends: a name, the calling AE that routes it, its datasets."""

    @property
    def name(self) -> str: ...
    @property
    def calling_ae(self) -> str: ...
    def datasets(self) -> list[Dataset]: ...


@dataclass(frozen=True)
class RealInput:
    """One class of real input: pydicom test file, how the series is built, the tasks."""

    name: str  # short label
    file: str  # pydicom test file
    n: int  # slices built from it (0 = the file itself, as received)
    noise: float  # Gaussian noise added (physical units)
    calling_ae: str  # routes it to its rule

    def datasets(self) -> list[Dataset]:
        if self.n == 0:
            return [pydicom.dcmread(str(get_testdata_file(self.file)))]
        return series_from_real_slice(self.file, self.n, noise=self.noise, seed=7)


INPUTS = (
    # GE-style 512 px head slice, Pixel Padding Value -2000 (-3024 HU), head holder, 25 HU
    RealInput("head-ct-512-padding", "693_UNCR.dcm", 4, 25.0, "CT_HEAD"),
    # GE LightSpeed 128 px CT
    RealInput("ge-ct-128", "CT_small.dcm", 4, 25.0, "CT_SMALL"),
    # Philips 1024 px MR (Rescale Slope 0.000061 ... in Real World Value form)
    RealInput("philips-mr-1024", "MR2_UNCR.dcm", 2, 0.0, "MR_PHILIPS"),
    # multi-frame MR without Plane Position / Orientation: refused, named reason
    RealInput("mr-multiframe-no-geometry", "emri_small.dcm", 0, 0.0, "MR_EMRI"),
)
TASKS: dict[str, list[dict[str, Any]]] = {
    "CT_HEAD": [{"task": "ct_denoise", "output_format": "sc"},
                {"task": "ct_to_mr", "params": {"target": "t1w"}, "output_format": "enhanced"}],
    "CT_SMALL": [{"task": "ct_denoise", "output_format": "sc"}],
    "MR_PHILIPS": [{"task": "mr_denoise", "output_format": "sc"}],
    "MR_EMRI": [{"task": "mr_denoise", "output_format": "sc"}],
}


@dataclass
class Outcome:
    """What happened to one input: per engine job, its outcome or failure."""

    input: Any  # an Input
    study_uid: str
    seconds: float
    jobs: list[dict[str, Any]] = field(default_factory=list)
    delivered: list[str] = field(default_factory=list)  # output series in Orthanc
    storescu_log: str = ""  # what storescu said, for an input expected to be refused


def approve_shipped(models: Path, ledger: Any, key: Ed25519PrivateKey) -> None:
    from audit.modelgate import Approver, ModelGate

    gate = ModelGate(ledger, [Approver("tester", key.public_key())])
    for name in MODELS:
        shutil.copytree(WEIGHTS / name, models / name)
        gate.approve(models / name, key)


def run_real_inputs(tmp_path: Path, orthanc: Any, inputs: tuple[Input, ...] = INPUTS,
                    timeout_s: float = 600, *, tasks: dict[str, list[dict[str, Any]]] | None = None,
                    hold_rules: tuple[dict[str, Any], ...] = ()) -> tuple[list[Outcome], Any]:
    """Send every input with storescu, wait until each study's jobs are finished (a study
    whose calling AE only a hold rule routes: until each object sent has its
    ``instance.left_out`` ledger entry); returns the outcomes and the (stopped) node.
    ``tasks``: per calling AE the rule's tasks (default :data:`TASKS`); ``hold_rules`` come
    first, each matching on ``calling_ae`` (and more)."""
    from audit.ledger import Ledger
    from audit.modelgate import public_key_b64
    from audit.watermark import WatermarkKey
    from config.settings import load_settings
    from node.app import create_node
    from node.pipeline.jobs import JobKind, JobState
    from tests.support.dimse import dcmtk, node_settings_dict
    from tests.support.net import get_port

    storescu = dcmtk("storescu")
    approver = Ed25519PrivateKey.generate()
    tmp_path.mkdir(parents=True, exist_ok=True)
    models, data, port = tmp_path / "models", tmp_path / "node", get_port()
    rule_tasks = TASKS if tasks is None else tasks
    held_aes = {str(r["match"]["calling_ae"]) for r in hold_rules}
    peers = [{"ae_title": ae} for ae in sorted({i.calling_ae for i in inputs})]
    cfg = node_settings_dict(
        data, port,
        audit={"approvers": [{"name": "tester",
                              "public_key": public_key_b64(approver.public_key())}],
               "models_dir": str(models)},
        engine={"device": "cpu"},
        pipeline={
            "enabled": True, "quiet_period_s": 2,
            "destinations": [{"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet,
                              "host": "127.0.0.1", "port": orthanc.dicom_port,
                              "accepts_synthetic": True, "backoff_s": 1}],
            "rules": [*hold_rules,
                      *({"name": ae.lower(), "match": {"calling_ae": ae},
                         "tasks": ts, "destinations": ["pacs"]}
                        for ae, ts in rule_tasks.items())],
        })
    cfg["dimse"]["allowed_peers"] = cfg["dimse"]["allowed_peers"] + peers
    cfg_file = tmp_path / "synthnode.toml"
    cfg_file.write_bytes(tomli_w.dumps(cfg).encode())
    settings = load_settings(cfg_file)
    key = WatermarkKey.generate(key_id=6)
    settings.watermark_key_file.parent.mkdir(parents=True, exist_ok=True)
    key.to_file(settings.watermark_key_file)
    node = create_node(settings)
    approve_shipped(models, Ledger(node.ctx.engine), approver)
    node.start()
    outcomes: list[Outcome] = []
    try:
        for inp in inputs:
            files = []
            dss = inp.datasets()
            for k, ds in enumerate(dss):
                p = tmp_path / f"{inp.name}-{k}.dcm"
                ds.save_as(p, enforce_file_format=True)
                files.append(str(p))
            study = str(dss[0].StudyInstanceUID)
            t0 = time.perf_counter()
            refused = bool(getattr(inp, "ingest_refused", False))
            # an input expected to be refused: every object sent (storescu halts by default)
            sent = subprocess.run([storescu, *(["--no-halt"] if refused else []),
                                   "-aet", inp.calling_ae, "-aec", "SYNTHNODE",
                                   "127.0.0.1", str(port), *files], check=not refused,
                                  timeout=120, capture_output=True, text=True)
            if refused:  # expected to be refused at ingest: nothing to wait for
                outcomes.append(Outcome(inp, study, time.perf_counter() - t0,
                                        storescu_log=sent.stdout + sent.stderr))
                continue
            pipe = node.pipeline
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if inp.calling_ae in held_aes:
                    left = {e.event.subject.get("sop_uid") for e in node.ctx.ledger.entries()
                            if e.event.type.value == "instance.left_out"}
                    if {str(d.SOPInstanceUID) for d in dss} <= left:
                        break
                    time.sleep(0.5)
                    continue
                js = pipe.jobs.list(study_uid=study)
                engine = [j for j in js if j.kind is JobKind.ENGINE]
                if (len(engine) == len(rule_tasks[inp.calling_ae])
                        and all(j.state in (JobState.SUCCEEDED, JobState.FAILED,
                                            JobState.CANCELLED) for j in js)):
                    break
                time.sleep(0.5)
            else:
                raise TimeoutError(f"{inp.name}: jobs not finished in {timeout_s} s")
            out = Outcome(inp, study, time.perf_counter() - t0)
            for j in pipe.jobs.list(study_uid=study):
                if j.kind is JobKind.ENGINE:
                    out.jobs.append({"task": j.task, "state": j.state.value,
                                     "error": j.error, "result": j.result or {}})
                elif j.state is JobState.SUCCEEDED:
                    out.delivered.append(str(j.series_uid))
            outcomes.append(out)
    finally:
        node.stop(grace_s=10)
    return outcomes, node


def job_outcome(j: dict[str, Any]) -> str:
    """A job's outcome for a results table: refused with the error, or the outcome with
    the failed checks of held outputs and a refused dispatch."""
    r = j["result"]
    if j["state"] == "failed":
        return f"refused: {j['error']}"
    what = str(r.get("outcome", "?"))
    if r.get("held"):
        what += " (" + ", ".join(c for h in r["held"] for c in h["checks"]) + ")"
    if r.get("refused"):
        what += " (watermark_unverified)"
    return what


def table(outcomes: list[Outcome]) -> str:
    """bench/RESULTS.md rows: file, vendor, transfer syntax, size, task, outcome, seconds."""
    rows = ["| input | file | vendor | transfer syntax | size | task | outcome | seconds |",
            "|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        ds = pydicom.dcmread(str(get_testdata_file(o.input.file)), stop_before_pixels=True)
        size = f"{ds.Rows}x{ds.Columns}x{max(o.input.n, int(ds.get('NumberOfFrames', 1)))}"
        for j in o.jobs:
            what = job_outcome(j)
            rows.append(f"| {o.input.name} | {o.input.file} | "
                        f"{ds.get('Manufacturer', '') or '-'} | "
                        f"{ds.file_meta.TransferSyntaxUID.name} | {size} | {j['task']} | "
                        f"{what[:90]} | {o.seconds:.1f} |")
    return "\n".join(rows)


def dump(outcomes: list[Outcome], path: Path) -> None:
    path.write_text(json.dumps([{"input": o.input.name, "study": o.study_uid,
                                 "seconds": o.seconds, "jobs": o.jobs,
                                 "delivered": o.delivered} for o in outcomes],
                               indent=1, default=str))
