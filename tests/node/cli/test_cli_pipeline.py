"""``synthnode rules test``, ``jobs list|show|retry|cancel`` and ``study complete``."""
from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path

import pytest
from typer.testing import CliRunner

from config.settings import load_settings
from node.app import build_context
from node.cli import app
from node.ingest.ingestor import Ingestor
from node.pipeline.jobs import JobStore
from tests.support.factory import make_series

CONFIG = """
environment = "development"
data_dir = "data"

[pipeline]
quiet_period_s = 3600

[[pipeline.destinations]]
name = "pacs"
kind = "dicomweb"
url = "http://127.0.0.1:9/dicom-web"
accepts_synthetic = true

[[pipeline.rules]]
name = "mr-only"
match = { modality = "MR" }
tasks = [{ task = "mr_denoise" }]

[[pipeline.rules]]
name = "ct-large"
match = { modality = "CT", rows = ">=64", calling_ae = "CT.*" }
tasks = [{ task = "ct_denoise", output_format = "enhanced" }]
destinations = ["pacs"]
"""


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    p = tmp_path / "synthnode.toml"
    p.write_text(CONFIG)
    return p


def _write(tmp_path: Path, datasets, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    for i, ds in enumerate(datasets):
        ds.save_as(d / f"{i}.dcm", enforce_file_format=True)
    return d


def test_rules_test_explains(tmp_path: Path, cfg: Path) -> None:
    big = _write(tmp_path, make_series(2, rows=64, cols=64), "big")
    small = _write(tmp_path, make_series(2, rows=32, cols=32), "small")
    r = CliRunner().invoke(app, ["rules", "test", str(big), str(small), "--calling-ae", "CT7",
                                 "--json", "-c", str(cfg)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    routed = [s for s in out["series"] if s["rule"] == "ct-large"]
    unrouted = [s for s in out["series"] if s["rule"] is None]
    assert len(routed) == 1 and len(unrouted) == 1
    assert routed[0]["tasks"] == ["ct_denoise"] and routed[0]["destinations"] == ["pacs"]
    reasons = unrouted[0]["verdicts"][1]["reasons"]
    assert any("rows 32 fails >=64" in x for x in reasons)
    text = CliRunner().invoke(app, ["rules", "test", str(big), "-c", str(cfg)])
    assert text.exit_code == 0 and "not routed" in text.output  # no calling AE given
    assert "calling_ae is absent" in " ".join(text.output.split())  # rich wraps lines


def test_study_complete_and_jobs_commands(tmp_path: Path, cfg: Path) -> None:
    settings = load_settings(cfg)
    ctx = build_context(settings, fsync=False)
    from node.pipeline.orchestrator import Pipeline

    pipe = Pipeline.from_context(ctx)
    series = make_series(2, rows=64, cols=64)
    ing = Ingestor(ctx)
    for ds in series:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        ing.ingest_part10(buf.getvalue(), calling_ae="CT1", called_ae="SYNTHNODE", source="dimse")
    pipe.tracker.shutdown()
    study = str(series[0].StudyInstanceUID)
    run = CliRunner()
    r = run.invoke(app, ["study", "complete", study, "-c", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "1 engine job(s) queued" in r.output
    r = run.invoke(app, ["study", "complete", study, "-c", str(cfg)])
    assert r.exit_code == 1 and "already complete" in r.output
    r = run.invoke(app, ["study", "complete", "1.2.3.4", "-c", str(cfg)])
    assert r.exit_code == 1 and "unknown study" in r.output

    r = run.invoke(app, ["jobs", "list", "--json", "-c", str(cfg)])
    (job,) = json.loads(r.output)
    assert job["state"] == "queued" and job["task"] == "ct_denoise" and job["rule"] == "ct-large"
    r = run.invoke(app, ["jobs", "show", job["id"][:8], "-c", str(cfg)])
    assert json.loads(r.output)["spec"]["output_format"] == "enhanced"
    r = run.invoke(app, ["jobs", "retry", job["id"], "-c", str(cfg)])
    assert r.exit_code == 1 and "queued -> queued is not allowed" in r.output
    r = run.invoke(app, ["jobs", "cancel", job["id"], "-c", str(cfg)])
    assert r.exit_code == 0 and "cancelled" in r.output
    r = run.invoke(app, ["jobs", "retry", job["id"], "-c", str(cfg)])
    assert r.exit_code == 0
    store = JobStore(ctx.engine)
    assert store.get(job["id"]).state.value == "queued"
    r = run.invoke(app, ["jobs", "list", "--state", "bogus", "-c", str(cfg)])
    assert r.exit_code == 2
    r = run.invoke(app, ["jobs", "list", "-c", str(cfg)])
    assert r.exit_code == 0 and job["id"][:8] in r.output
