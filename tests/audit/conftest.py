"""Fixtures for the audit tests: a migrated ledger with a signing key and checkpoint file."""
from __future__ import annotations

from pathlib import Path

import pytest
from tests.support.ledger import LedgerEnv

from audit.service import open_ledger
from node.db import make_engine


@pytest.fixture
def ledger_env(migrated_db: str, tmp_path: Path) -> LedgerEnv:
    key_file = tmp_path / "keys" / "ledger.key"
    cp_file = tmp_path / "checkpoints.log"
    svc = open_ledger(make_engine(migrated_db), key_file=key_file, checkpoint_file=cp_file,
                      origin="test.example/ledger")
    return LedgerEnv(migrated_db, key_file, cp_file, svc)
