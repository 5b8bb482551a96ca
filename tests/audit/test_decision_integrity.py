"""Decisions read hashed leaf data: editing the copied ``event_type`` column of a model or
key revocation does not re-enable the model, and ``audit verify --deep`` reports the edit."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as st_save
from sqlalchemy import update

from audit.ledger import Ledger
from audit.modelgate import (
    Approver,
    ModelGate,
    ModelRefused,
    build_manifest,
    generate_approver_key,
    key_fingerprint,
    write_manifest,
)
from audit.tables import ledger_entries
from audit.verify import verify_database
from node.db import make_engine
from tests.support.ledger import LedgerEnv, make_event


def _model(root: Path) -> Path:
    d = root / "ct-restore-tiny"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(
        st_save({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}))
    (d / "config.json").write_text(json.dumps({"channels": 8}))
    (d / "MODEL_CARD.md").write_text("# tiny\nFor tests only.\n")
    write_manifest(d, build_manifest(d, model_id="ct-restore-tiny", version="1.0.0",
                                     task="ct_restore", intended_use="unit tests"))
    return d


def _retype(ledger: Ledger, old: str, new: str) -> int:
    with ledger.engine.begin() as conn:
        return conn.execute(update(ledger_entries).where(ledger_entries.c.event_type == old)
                            .values(event_type=new)).rowcount


@pytest.mark.parametrize("what", ["model", "key"])
def test_revocation_column_tamper_does_not_reenable(migrated_db: str, tmp_path: Path,
                                                   what: str) -> None:
    ledger = Ledger(make_engine(migrated_db))
    key = generate_approver_key(tmp_path / "keys" / "alice.key")
    gate = ModelGate(ledger, [Approver("alice", key.public_key())], actor="user:test")
    model = _model(tmp_path / "models")
    gate.approve(model, key)
    gate.load(model)
    if what == "model":
        gate.revoke("ct-restore-tiny", "1.0.0", "lesion erasure found")
        assert _retype(ledger, "model.revoked", "model.refused") == 1
    else:
        gate.revoke_key(key_fingerprint(key.public_key()), "laptop stolen")
        assert _retype(ledger, "key.revoked", "model.refused") == 1
    with pytest.raises(ModelRefused, match="revoked"):
        gate.load(model)


def test_deep_verify_checks_copied_columns(ledger_env: LedgerEnv) -> None:
    env = ledger_env
    for i in range(6):
        env.service.ledger.append(make_event(i))
    env.service.checkpoint()
    engine = env.service.ledger.engine
    assert verify_database(engine, env.service.verifier, env.checkpoint_file, deep=True).ok
    with engine.begin() as conn:
        conn.execute(update(ledger_entries).where(ledger_entries.c.seq == 3)
                     .values(event_type="model.revoked"))
    rep = verify_database(engine, env.service.verifier, env.checkpoint_file, deep=True)
    assert not rep.ok and rep.first_bad_entry == 3
    assert rep.problems[0].kind == "index"
