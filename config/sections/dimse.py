"""DIMSE service settings: AE title, network, access control, C-MOVE destinations."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from config.sections import Section

_AE_MAX = 16


def _check_ae(value: str) -> str:
    v = value.strip()
    if not v or len(v) > _AE_MAX or "\\" in v or any(ord(c) < 0x20 for c in v):
        raise ValueError(
            f"AE title must be 1-{_AE_MAX} characters without backslash or control "
            f"characters (PS3.5 6.2, VR AE), got {value!r}"
        )
    return v


PeerRole = Literal["store", "query", "retrieve"]


def _all_roles() -> list[PeerRole]:
    return ["store", "query", "retrieve"]


class Peer(Section):
    """A calling AE allowed to associate, optionally bound to a host address, with the
    services it may use: store (C-STORE, Storage Commitment), query (C-FIND), retrieve
    (C-GET, C-MOVE). C-MOVE destinations are separate: ``move_destinations``."""

    ae_title: str
    host: str | None = Field(default=None, description="if set, the peer must connect from this IP")
    roles: list[PeerRole] = Field(default_factory=_all_roles, min_length=1)
    tls_subject: str | None = Field(
        default=None, description="if set, the peer must connect over DICOM TLS with a client "
        "certificate whose subject Common Name is this")

    _v_ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))


class DimseTls(Section):
    """DICOM TLS on the SCP (PS3.15 B.9 / BCP 195: TLS 1.2 or later, ECDHE with AES-GCM or
    ChaCha20). With ``require_client_cert`` the peer must present a certificate signed by
    ``ca_file``; ``allowed_peers[].tls_subject`` maps its Common Name to the calling AE."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = Field(default=None, description="CA(s) for client certificates")
    require_client_cert: bool = True
    handshake_timeout_s: float = Field(default=10.0, gt=0)


class MoveDestination(Section):
    """A C-MOVE destination AE, resolved by its AE title."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    _v_ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))


class DuplicatePolicy(str, Enum):
    """What to do when an object arrives whose SOP Instance UID is already stored
    with different content (an identical re-send is always a success, stored once)."""

    REJECT = "reject"  # failure status (0x0111), the stored copy is kept (default)
    KEEP_FIRST = "keep_first"  # warning status (0xB006), the stored copy is kept
    REPLACE = "replace"  # the new object replaces the stored one


class DimseSettings(Section):
    ae_title: str = "SYNTHNODE"
    bind_address: str = Field(default="127.0.0.1",
                              description="loopback until opened (0.0.0.0 = every interface)")
    port: int = Field(default=11112, ge=1, le=65535)
    accept_any_calling_ae: bool = Field(
        default=False, description="development only: skip the calling-AE allow-list"
    )
    allowed_peers: list[Peer] = Field(default_factory=list)
    check_called_ae: bool = True
    max_associations: int = Field(
        default=16, ge=1, le=1024,
        description="open associations (counted once the calling AE is accepted)")
    max_associations_per_host: int = Field(
        default=8, ge=1, le=1024, description="open associations from one peer IP address")
    max_connections: int = Field(
        default=256, ge=1, le=4096,
        description="TCP connections held at once, associated or not; more are closed")
    max_associate_rq_bytes: int = Field(
        default=256 * 1024, ge=1024,
        description="largest A-ASSOCIATE-RQ PDU read; larger ones are aborted unread")
    pdu_read_deadline_s: float = Field(
        default=30.0, gt=0, description="a whole PDU must arrive within this time")
    refusal_window_s: float = Field(
        default=60.0, gt=0,
        description="ledger: first refusal per peer host and reason recorded at once, "
        "the rest counted and summarised once per window")
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    network_timeout_s: float = Field(default=60.0, gt=0)
    max_pdu: int = Field(default=1048576, ge=0, description="0 = unlimited (PS3.8 D.1)")
    acceptor_processes: int = Field(default=1, ge=1, le=64)
    move_destinations: list[MoveDestination] = Field(default_factory=list)
    tls: DimseTls | None = Field(default=None, description="DICOM TLS on the SCP; empty = off")
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.REJECT
    commitment_report: Literal["auto", "same_association", "new_association"] = Field(
        default="auto",
        description="Storage Commitment N-EVENT-REPORT (PS3.4 J.3.3): on the N-ACTION's "
        "association, or on a new one to the requester (its AE looked up in "
        "move_destinations); auto = same while it is open, else new",
    )

    _v_ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))
