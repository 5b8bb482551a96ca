"""DICOMweb (QIDO-RS / WADO-RS / STOW-RS) server settings, read by :mod:`node.dicomweb`."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from config.sections import Section

#: What a token may do: store (STOW-RS), read (QIDO-RS / WADO-RS / viewer), audit (the
#: ledger's read endpoints), admin (everything).
Scope = Literal["store", "read", "audit", "admin"]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class Token(Section):
    """One bearer token. Keep only its SHA-256 in the config (``synthnode tokens create``
    prints it); a plain ``token`` is accepted for development and never logged."""

    name: str = Field(min_length=1)
    token_sha256: str | None = Field(default=None, description="hex SHA-256 of the token")
    token: SecretStr | None = Field(default=None, description="plain token (development)")
    scopes: list[Scope] = Field(description="store | read | audit | admin")

    @field_validator("token_sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not _HEX64.match(v.lower()):
            raise ValueError("token_sha256 must be 64 hex digits")
        return v.lower() if v else v

    @model_validator(mode="after")
    def _one_secret(self) -> Token:
        if (self.token_sha256 is None) == (self.token is None):
            raise ValueError("give exactly one of token_sha256 and token")
        return self


class OidcSettings(Section):
    """Bearer JWTs from an identity provider, checked against its keys (a JWKS file)."""

    enabled: bool = False
    jwks_file: Path | None = Field(default=None, description="the provider's JWKS (JSON)")
    issuer: str | None = Field(default=None, description="required iss claim")
    audience: str | None = Field(default=None, description="required in the aud claim")
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256", "EdDSA"])
    scope_claim: str = Field(default="scope", description="claim holding the granted "
                             "values: a space-separated string or a list")
    scope_map: dict[str, list[Scope]] = Field(
        default_factory=dict, description="claim value -> scopes, e.g. "
        '{"pacs.read" = ["read"], "pacs.admin" = ["admin"]}')
    name_claim: str = Field(default="sub", description="recorded as the actor oidc:VALUE")
    leeway_s: int = Field(default=30, ge=0, description="clock skew allowed on exp / nbf")

    @model_validator(mode="after")
    def _jwks(self) -> OidcSettings:
        if self.enabled and self.jwks_file is None:
            raise ValueError("oidc.enabled needs oidc.jwks_file")
        return self


class DicomwebSettings(Section):
    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = Field(default=8042, ge=0, le=65535, description="0: any free port")
    tokens: list[Token] = Field(default_factory=list)
    oidc: OidcSettings = Field(default_factory=OidcSettings)
    anonymous_scopes: list[Scope] = Field(
        default_factory=list,
        description="scopes granted to requests without a token (empty: a token is required)")
    cors_origins: list[str] = Field(default_factory=list,
                                    description="origins allowed by CORS ('*' for any)")
    tls_cert_file: Path | None = Field(default=None, description="PEM certificate: HTTPS")
    tls_key_file: Path | None = Field(default=None, description="PEM private key")
    max_request_bytes: int = Field(default=2 * 1024**3, ge=1,
                                   description="STOW-RS request body limit (413 above)")
    viewer_dir: Path | None = Field(
        default=None, description="built OHIF viewer (dist/) served at /viewer/; "
        "default: <data_dir>/viewer when it exists")
    access_flush_s: float = Field(default=1.0, gt=0,
                                  description="QIDO / WADO reads are written to the ledger "
                                  "in batches this often")
    metadata_warm: bool = Field(
        default=True, description="build the DICOM JSON metadata of each stored instance in "
        "the background once stores pause (otherwise on its first WADO-RS metadata read)")

    @model_validator(mode="after")
    def _tls_pair(self) -> DicomwebSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self
