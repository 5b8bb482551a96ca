"""Index database and file store settings."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from config.sections import Section


class DatabaseSettings(Section):
    url: str = Field(
        default="",
        description="SQLAlchemy URL; empty = sqlite file index.db in the data directory",
    )
    echo: bool = False

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if v and not v.split(":", 1)[0].startswith(("sqlite", "postgresql")):
            raise ValueError("only sqlite:// and postgresql+psycopg:// URLs are supported")
        return v


class StorageSettings(Section):
    root: Path | None = Field(default=None, description="file store; empty = <data_dir>/store")
    retention_days: int | None = Field(
        default=None, ge=1,
        description="remove instances received more than this many days ago (checked at start "
                    "and hourly, each removal in the ledger); None = keep forever")
    min_free_bytes: int = Field(
        default=256 * 1024 * 1024, ge=0,
        description="refuse stores (0xA700 / HTTP 507) below this much free space",
    )
