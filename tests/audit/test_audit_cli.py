"""`synthnode audit ...` and `synthnode models ...` end to end on a real config, plus the
standalone verifier as a separate process."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.support.ledger import make_event
from safetensors.numpy import save as st_save
from sqlalchemy import update
from typer.testing import CliRunner

from audit import merkle
from audit.ledger import Ledger
from audit.tables import ledger_entries
from node.cli import app
from node.db import make_engine

runner = CliRunner()


@pytest.fixture
def site(migrated_db: str, tmp_path: Path) -> Path:
    models = tmp_path / "models"
    d = models / "tiny-restore"
    d.mkdir(parents=True)
    (d / "weights.safetensors").write_bytes(st_save({"w": np.ones((2, 2), dtype=np.float32)}))
    (d / "config.json").write_text(json.dumps({"model_id": "tiny-restore", "version": "0.1",
                                               "task": "ct_restore", "intended_use": "tests"}))
    (d / "MODEL_CARD.md").write_text("# tiny\n")
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'environment = "development"\ndata_dir = "{tmp_path / "var"}"\n'
                   f'[database]\nurl = "{migrated_db}"\n'
                   f'[audit]\norigin = "site.example/ledger"\nmodels_dir = "{models}"\n')
    return cfg


def run(*args: str) -> str:
    r = runner.invoke(app, list(args))
    assert r.exit_code == 0, (args, r.output)
    return r.output


def test_audit_commands(site: Path, migrated_db: str, tmp_path: Path) -> None:
    ledger = Ledger(make_engine(migrated_db))
    ledger.append_many([make_event(i) for i in range(9)])
    note = run("audit", "checkpoint", "-c", str(site))
    assert note.startswith("site.example/ledger\n9\n")
    vkey = tmp_path / "ledger.vkey"
    run("audit", "pubkey", "-c", str(site), "-o", str(vkey))
    assert vkey.read_text().startswith("site.example/ledger+")
    assert "OK: 10 entries" in run("audit", "verify", "-c", str(site))

    proof = json.loads(run("audit", "prove", "3", "-c", str(site)))
    assert proof["tree_size"] == 9 and proof["checkpoint"] == note
    merkle.verify_inclusion(3, 9, bytes.fromhex(proof["leaf_hash"]), [bytes.fromhex(p) for p in proof["proof"]],
                            bytes.fromhex(proof["root_hash"]))
    cons = json.loads(run("audit", "consistency", "2", "9", "-c", str(site)))
    merkle.verify_consistency(2, 9, bytes.fromhex(cons["old_root"]), bytes.fromhex(cons["new_root"]),
                              [bytes.fromhex(p) for p in cons["proof"]])

    lines = run("audit", "query", "-c", str(site), "--type", "instance.received", "--actor", "ae:MOD1",
                "--json").splitlines()
    assert [json.loads(x)["seq"] for x in lines] == [1, 4, 7]
    sop = make_event(5).subject["sop_uid"]
    assert json.loads(run("audit", "query", "-c", str(site), "--sop", sop, "--json"))["seq"] == 5
    assert len(run("audit", "query", "-c", str(site), "--since", "2000-01-01", "--json").splitlines()) == 11
    assert "seq" in run("audit", "query", "-c", str(site), "--limit", "3")  # table form
    assert run("audit", "query", "-c", str(site), "--until", "2000-01-01", "--json") == ""

    exp = tmp_path / "ledger.jsonl"
    run("audit", "export", "-c", str(site), "-f", "jsonl", "-o", str(exp))
    for extra in (["--syslog", "udp://127.0.0.1:514"], ["--type", "instance.received"]):
        r = runner.invoke(app, ["audit", "export", "-c", str(site), "-f", "jsonl", *extra])
        assert r.exit_code == 2 and "error:" in r.output  # refused, never silently ignored
    for fmt in ("dicom", "fhir"):
        out = tmp_path / f"x.{fmt}"
        run("audit", "export", "-c", str(site), "-f", fmt, "-o", str(out))
        assert out.stat().st_size > 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv:  # ATNA over syslog (RFC 5426)
        srv.bind(("127.0.0.1", 0))
        srv.settimeout(5)
        run("audit", "export", "-c", str(site), "-f", "dicom", "--type", "checkpoint.signed",
            "-o", str(tmp_path / "cp.xml"), "--syslog", f"udp://127.0.0.1:{srv.getsockname()[1]}")
        msg, _ = srv.recvfrom(65535)
    assert b" IHE+RFC-3881 - " in msg and b"<AuditMessage>" in msg and b'csd-code="110101"' in msg

    # the standalone verifier: separate process, only URL / export + public key
    cpf = tmp_path / "var" / "checkpoints.log"
    for src in (["--db", migrated_db], ["--export", str(exp)]):
        p = subprocess.run([sys.executable, "-m", "audit.verify", *src, "--pubkey", str(vkey),
                            "--checkpoints", str(cpf)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        assert p.stdout.startswith("OK:")

    with ledger.engine.begin() as conn:  # tamper: change one stored leaf
        conn.execute(update(ledger_entries).where(ledger_entries.c.seq == 6).values(data=b'{"forged":1}'))
    r = runner.invoke(app, ["audit", "verify", "-c", str(site)])
    assert r.exit_code == 1 and "first bad entry: 6" in r.output
    p = subprocess.run([sys.executable, "-m", "audit.verify", "--db", migrated_db, "--pubkey", str(vkey)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "first bad entry: 6" in p.stdout


def test_models_workflow(site: Path, tmp_path: Path) -> None:
    key = tmp_path / "admin.key"
    run("models", "keygen", "--out", str(key), "--name", "site-admin", "--add-to-config", str(site))
    assert key.stat().st_mode & 0o777 == 0o600
    assert "[[audit.approvers]]" in site.read_text()
    run("models", "manifest", str(tmp_path / "models" / "tiny-restore"))
    assert "unapproved" in run("models", "list", "-c", str(site))
    r = runner.invoke(app, ["models", "verify", "--all", "-c", str(site)])
    assert r.exit_code == 1 and "unsigned" in r.output
    r = runner.invoke(app, ["models", "approve", "--all", "--key", str(key), "-c", str(site)],
                      input="y\n")  # lists what it approves and asks first
    assert r.exit_code == 0 and "tiny-restore 0.1 (unapproved)" in r.output, r.output
    assert "approved" in run("models", "list", "-c", str(site))
    assert "OK tiny-restore 0.1" in run("models", "verify", "--all", "-c", str(site))
    run("models", "revoke", "tiny-restore", "0.1", "--reason", "test", "--yes", "-c", str(site))
    r = runner.invoke(app, ["models", "verify", "--all", "-c", str(site)])
    assert r.exit_code == 1 and "revoked" in r.output


def test_permanent_model_acts_refuse_unknown_targets(site: Path, migrated_db: str,
                                                      tmp_path: Path) -> None:
    """Typos never become permanent ledger records: an unknown model version, a truncated
    key id and a key that is not a configured approver are refused (exit 1, nothing
    recorded); a known target is acted on only after a yes."""
    from audit.events import EventType

    key = tmp_path / "admin.key"
    run("models", "keygen", "--out", str(key), "--name", "site-admin", "--add-to-config", str(site))
    stranger = tmp_path / "stranger.key"
    run("models", "keygen", "--out", str(stranger), "--name", "nobody")  # not in the config
    run("models", "manifest", str(tmp_path / "models" / "tiny-restore"))
    ledger = Ledger(make_engine(migrated_db))
    before = ledger.size()

    r = runner.invoke(app, ["models", "approve", "--all", "--key", str(stranger), "--yes",
                            "-c", str(site)])
    assert r.exit_code == 1 and "is not among the [[audit.approvers]]" in r.output
    r = runner.invoke(app, ["models", "revoke", "nosuchmodel", "1.0", "--reason", "x", "--yes",
                            "-c", str(site)])
    assert r.exit_code == 1 and "unknown model 'nosuchmodel' version '1.0'" in r.output
    r = runner.invoke(app, ["models", "revoke", "tiny-restor", "0.1", "--reason", "x", "--yes",
                            "-c", str(site)])
    assert r.exit_code == 1 and "did you mean 'tiny-restore 0.1'" in r.output
    from audit.modelgate import key_fingerprint, load_private_key

    kid = key_fingerprint(load_private_key(key).public_key())
    r = runner.invoke(app, ["models", "revoke", "--key-id", kid[:8], "--reason", "x", "--yes",
                            "-c", str(site)])
    assert r.exit_code == 1 and f"did you mean {kid}?" in r.output
    r = runner.invoke(app, ["models", "revoke", "tiny-restore", "0.1", "--reason", "x",
                            "-c", str(site)], input="n\n")
    assert r.exit_code == 1 and "not confirmed" in r.output
    assert ledger.size() == before  # none of that was recorded
    r = runner.invoke(app, ["models", "revoke", "--key-id", kid, "--reason", "lost laptop",
                            "-c", str(site)], input="y\n")
    assert r.exit_code == 0, r.output
    (rev,) = ledger.query(event_types=[EventType.KEY_REVOKED.value])
    assert rev.event.subject["key_id"] == kid


def test_lineage_cli_text_and_json(site: Path, migrated_db: str) -> None:
    """`audit lineage`: the text tree nests source -> engine job (with its model) -> output
    series -> destination -> each dispatch, unwrapped when not on a terminal; --json is the
    same tree as audit.export.lineage."""
    from tests.support.ledger import OUT, SRC, STUDY, pipeline_events

    from audit.export import lineage

    ledger = Ledger(make_engine(migrated_db))
    ledger.append_many(pipeline_events())
    text = run("audit", "lineage", STUDY, "-c", str(site))
    lines = text.splitlines()

    def at(needle: str) -> tuple[int, int]:
        (i,) = [k for k, line in enumerate(lines) if needle in line]
        return i, len(lines[i]) - len(lines[i].lstrip("│├└─ "))

    chain = [at(f"source series {SRC}"), at("engine job job-7"), at(f"output series {OUT}"),
             at("-> PACS")]
    assert [c[0] for c in chain] == sorted(c[0] for c in chain)
    assert [c[1] for c in chain] == sorted({c[1] for c in chain})  # strictly deeper each step
    assert "model ct-restore" in lines[chain[1][0]]
    assert at("dispatch.failed")[1] > chain[3][1] and "error=association rejected" in text
    assert max(len(x) for x in lines) > 80  # not wrapped at a default terminal width
    tree = json.loads(run("audit", "lineage", OUT, "--json", "-c", str(site)))
    assert tree == json.loads(json.dumps(lineage(ledger, OUT)))
    r = runner.invoke(app, ["audit", "lineage", "1.2.3.4.5.6.7.8.9", "-c", str(site)])
    assert r.exit_code == 1 and "no ledger entry mentions" in r.output
