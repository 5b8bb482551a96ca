"""Audit ledger, checkpoint and model-gate settings."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from config.sections import Section


class ApproverKey(Section):
    """A public key allowed to approve models (Ed25519, base64 raw 32 bytes or PEM file)."""

    name: str
    public_key: str = Field(description="base64 raw Ed25519 public key, or path to a PEM file")


class AuditSettings(Section):
    origin: str = Field(default="synthnode.local/ledger", description="checkpoint origin line")
    key_file: Path | None = Field(
        default=None, description="Ed25519 signing key; empty = <data_dir>/keys/ledger.key"
    )
    checkpoint_file: Path | None = Field(
        default=None, description="append-only; empty = <data_dir>/checkpoints.log"
    )
    checkpoint_interval_s: float = Field(default=60.0, gt=0)
    syslog_target: str | None = Field(
        default=None, description="udp://host:port or tcp://host:port (RFC 5424)"
    )
    approvers: list[ApproverKey] = Field(default_factory=list)
    models_dir: Path | None = Field(
        default=None, description="approved model folders; empty = bundled engine/weights"
    )
