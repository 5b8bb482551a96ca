"""DICOMweb (QIDO-RS / WADO-RS / STOW-RS) server settings."""
from __future__ import annotations

from pydantic import Field, SecretStr

from config.sections import Section


class Token(Section):
    name: str
    token: SecretStr
    scopes: list[str] = Field(description="store | read | audit | admin")


class DicomwebSettings(Section):
    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = Field(default=8042, ge=1, le=65535)
    tokens: list[Token] = Field(default_factory=list)
