"""The CLI as a tired administrator meets it: every command on a database that was never
migrated says one line and leaves nothing behind; human time input; tables that keep UIDs
whole at 80 columns; --plain with a header, --json; times with their zone; config check
with file, line and a suggestion; no data folder inside the installed code."""
from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from node.cli import app
from node.cli.output import Col, parse_time, render_table

runner = CliRunner()
STUDY = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678901"

#: every command that reads the node's database (arguments after the command words)
DB_COMMANDS = [
    ["studies"], ["jobs", "list"], ["jobs", "show", "abc"], ["jobs", "retry", "abc"],
    ["jobs", "cancel", "abc"], ["study", "complete", STUDY],
    ["audit", "verify"], ["audit", "prove", "0"], ["audit", "consistency", "1", "2"],
    ["audit", "query", "--since", "24h"], ["audit", "lineage", STUDY],
    ["audit", "patient", "PID1"], ["audit", "export", "-f", "jsonl"], ["audit", "pubkey"],
    ["audit", "checkpoint"], ["models", "list"], ["models", "verify", "--all"],
    ["models", "approve", "--all", "--key", "k.key", "--yes"],
    ["models", "revoke", "m", "1.0", "--reason", "r", "--yes"],
    ["serve", "--no-migrate"],
]


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    c = tmp_path / "site.toml"
    c.write_text(f'environment = "development"\ndata_dir = "{tmp_path / "var"}"\n')
    return c


@pytest.mark.parametrize("args", DB_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_unmigrated_database_one_line_nothing_created(cfg: Path, tmp_path: Path,
                                                      args: list[str]) -> None:
    r = runner.invoke(app, [*args, "-c", str(cfg)])
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines() == [
        f"error: database not initialised: run `synthnode db upgrade -c {cfg}`"], r.output
    assert not (tmp_path / "var" / "index.db").exists()
    assert not (tmp_path / "var").exists() or not any((tmp_path / "var").iterdir())


def test_models_approve_before_first_start_then_after_db_upgrade(cfg: Path, tmp_path: Path
                                                                 ) -> None:
    """README step 9 in order on a fresh install: keygen, approve (told exactly what to
    do), db upgrade, approve."""
    key = tmp_path / "admin.key"
    assert runner.invoke(app, ["models", "keygen", "--out", str(key), "--name", "admin",
                               "--add-to-config", str(cfg)]).exit_code == 0
    r = runner.invoke(app, ["models", "approve", "--all", "--key", str(key), "-c", str(cfg)])
    assert r.exit_code == 1 and f"run `synthnode db upgrade -c {cfg}`" in r.output
    assert runner.invoke(app, ["db", "upgrade", "-c", str(cfg)]).exit_code == 0
    r = runner.invoke(app, ["models", "approve", "--all", "--key", str(key), "--yes",
                            "-c", str(cfg)])
    assert r.exit_code == 0, r.output
    from audit.modelgate import ModelGate
    from config.settings import load_settings

    bundled = ModelGate.folders(load_settings(cfg).models_dir)
    assert bundled and r.output.count("\napproved ") == len(bundled)


def test_watermark_detect_without_database_creates_none(cfg: Path, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    r = runner.invoke(app, ["watermark", "detect", get_testdata_file("CT_small.dcm"),
                            "-c", str(cfg)])
    assert "no watermark key" in r.output
    assert not (tmp_path / "var" / "index.db").exists()


# -- time input ----------------------------------------------------------------------------
NOW = datetime(2026, 11, 22, 15, 30, tzinfo=UTC)


@pytest.mark.parametrize(("text", "expect"), [
    ("24h", datetime(2026, 11, 21, 15, 30, tzinfo=UTC)),
    ("90m", datetime(2026, 11, 22, 14, 0, tzinfo=UTC)),
    ("7d", datetime(2026, 11, 15, 15, 30, tzinfo=UTC)),
    ("2w", datetime(2026, 11, 8, 15, 30, tzinfo=UTC)),
    ("yesterday", datetime(2026, 11, 21, tzinfo=UTC)),
    ("today", datetime(2026, 11, 22, tzinfo=UTC)),
    ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),
    ("2026-11-01 08:00", datetime(2026, 11, 1, 8, tzinfo=UTC)),
    ("2026-11-01T08:00:00Z", datetime(2026, 11, 1, 8, tzinfo=UTC)),
    ("2026-11-01T09:00:00+01:00", datetime(2026, 11, 1, 8, tzinfo=UTC)),
])
def test_human_time_input(text: str, expect: datetime) -> None:
    assert parse_time(text, now=NOW) == expect


def test_audit_query_since_yesterday_and_bad_time(cfg: Path) -> None:
    assert runner.invoke(app, ["db", "upgrade", "-c", str(cfg)]).exit_code == 0
    r = runner.invoke(app, ["audit", "query", "--since", "yesterday", "-c", str(cfg)])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    r = runner.invoke(app, ["audit", "query", "--since", "last tuesday", "-c", str(cfg)])
    assert r.exit_code == 2 and "cannot read 'last tuesday' as a time" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


# -- tables ----------------------------------------------------------------------------------
def test_table_keeps_uids_whole_at_80_columns() -> None:
    cols = [Col("study", "Study Instance UID", "uid"), Col("pid", "Patient ID", "uid"),
            Col("date", "Date"), Col("n", "Instances", align="right"),
            Col("error", "error", "text")]
    rows = [{"study": STUDY, "pid": "PATIENT-0000000000042", "date": "20261122", "n": 120,
             "error": "association rejected by the peer: calling AE title not recognised"}]
    text = render_table(cols, rows, width=80)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    folded = "".join(line[:line.index("  ")] if "  " in line else line
                     for line in text.splitlines()[2:])
    assert STUDY in folded.replace(" ", "")  # every character, in order
    assert "recognised" in text and "Instances" in text.splitlines()[0]
    assert render_table(cols, rows, width=None).count("\n") == 2  # --wide: one line per row


def test_studies_plain_has_a_header_and_json(start_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from pydicom.data import get_testdata_file
    from tests.support.dimse import scu_store

    node = start_node()
    assert scu_store(node.address, [Path(get_testdata_file("CT_small.dcm"))]) == [0]
    cfg = tmp_path / "same.toml"
    cfg.write_text(f'environment = "development"\ndata_dir = "{node.ctx.settings.data_dir}"\n')
    lines = runner.invoke(app, ["studies", "--plain", "-c", str(cfg)]).output.splitlines()
    assert lines[0].split("\t") == ["study_uid", "patient_id", "date", "accession",
                                    "modalities", "series", "instances"]
    assert lines[1].split("\t")[1] == "1CT1" and len(lines) == 2
    (row,) = json.loads(runner.invoke(app, ["studies", "--json", "-c", str(cfg)]).output)
    assert row["modalities"] == "CT" and row["instances"] == 1


def test_jobs_times_carry_their_zone(cfg: Path) -> None:
    from audit.ledger import Ledger
    from config.settings import load_settings
    from node.db import make_engine
    from node.pipeline.jobs import JobKind, JobStore

    assert runner.invoke(app, ["db", "upgrade", "-c", str(cfg)]).exit_code == 0
    engine = make_engine(load_settings(cfg).database_url)
    store = JobStore(engine, Ledger(engine))
    jid = store.enqueue(JobKind.ENGINE, study_uid=STUDY, series_uid=STUDY + ".1",
                        task="ct_denoise", spec={"fingerprint": "f"})
    store.cancel(jid, "a reason long enough to need more than one line in a narrow table")
    engine.dispose()
    (j,) = json.loads(runner.invoke(app, ["jobs", "list", "--json", "-c", str(cfg)]).output)
    assert j["updated_at"].endswith("Z") and j["created_at"].endswith("Z")
    text = runner.invoke(app, ["jobs", "list", "-c", str(cfg)]).output
    assert "updated (UTC)" in text and f"{jid[:8]} cancelled: a reason long enough" in text
