"""Audit ledger, checkpoint, patient digest, syslog feed and model-gate settings."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from config.sections import Section


class ApproverKey(Section):
    """A public key allowed to approve models (Ed25519, base64 raw 32 bytes or PEM file)."""

    name: str
    public_key: str = Field(description="base64 raw Ed25519 public key, or path to a PEM file")


class SyslogFeed(Section):
    """Continuous feed of the ledger as DICOM audit messages (PS3.15 A.5, IHE ATNA) to an
    audit record repository: RFC 5424 messages over TLS (RFC 5425), TCP (RFC 6587
    octet counting) or UDP (RFC 5426). Off while ``host`` is empty."""

    host: str | None = Field(default=None, description="audit record repository; empty = off")
    port: int = Field(default=6514, ge=1, le=65535, description="6514 = syslog over TLS")
    transport: Literal["tls", "tcp", "udp"] = Field(
        default="tls", description="tls (RFC 5425, the ATNA default), tcp, or udp (may lose "
                                   "messages: no delivery check)")
    ca_file: Path | None = Field(
        default=None, description="CA certificate(s) that sign the repository's certificate; "
                                  "empty = the system's CAs")
    cert_file: Path | None = Field(
        default=None, description="this node's client certificate (mutual TLS, IHE ATNA node "
                                  "authentication); with key_file")
    key_file: Path | None = Field(default=None, description="private key of cert_file")
    server_name: str | None = Field(
        default=None, description="name the repository's certificate must carry; empty = host")
    app_name: str = Field(default="synthnode", max_length=48, description="RFC 5424 APP-NAME")
    start: Literal["beginning", "now"] = Field(
        default="beginning", description="where a feed without a cursor starts: the whole "
                                         "ledger, or only entries appended from now on")
    patient_ids: Literal["resolve", "digest"] = Field(
        default="resolve", description="Patient participant: the Patient ID from the index "
                                       "(resolve), or only the ledger's keyed digest")
    batch: int = Field(default=200, ge=1, le=10000, description="messages per confirmed write")
    poll_s: float = Field(default=1.0, gt=0, le=60, description="idle look at the ledger")
    retry_max_s: float = Field(default=60.0, gt=0, le=3600,
                               description="longest wait between reconnection attempts")
    cursor_file: Path | None = Field(
        default=None, description="last delivered ledger entry; empty = "
                                  "<data_dir>/syslog-feed.cursor")

    @model_validator(mode="after")
    def _pairs(self) -> SyslogFeed:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS)")
        if self.transport != "tls" and (self.ca_file or self.cert_file):
            raise ValueError(f"ca_file / cert_file need transport = \"tls\", not "
                             f"{self.transport!r}")
        return self


class AuditSettings(Section):
    origin: str = Field(default="synthnode.local/ledger", description="checkpoint origin line")
    key_file: Path | None = Field(
        default=None, description="Ed25519 signing key; empty = <data_dir>/keys/ledger.key"
    )
    patient_key_file: Path | None = Field(
        default=None, description="HMAC key of the ledger's patient digests; empty = "
                                  "<data_dir>/keys/patient.key (created on first start)")
    checkpoint_file: Path | None = Field(
        default=None, description="append-only; empty = <data_dir>/checkpoints.log"
    )
    checkpoint_interval_s: float = Field(default=60.0, gt=0)
    syslog_target: str | None = Field(
        default=None, description="signed checkpoints to udp://host:port or tcp://host:port "
                                  "(RFC 5424); the full feed is [audit.syslog]"
    )
    syslog: SyslogFeed = Field(default_factory=SyslogFeed)
    approvers: list[ApproverKey] = Field(default_factory=list)
    models_dir: Path | None = Field(
        default=None, description="approved model folders; empty = bundled engine/weights"
    )

    @field_validator("approvers")
    @classmethod
    def _unique_names(cls, v: list[ApproverKey]) -> list[ApproverKey]:
        seen: dict[str, int] = {}
        for i, a in enumerate(v):
            if a.name in seen:
                raise ValueError(f"approver name {a.name!r} is used by entries {seen[a.name]} and "
                                 f"{i} (names are how approvals are shown; make them unique)")
            seen[a.name] = i
        return v
