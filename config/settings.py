"""Settings root: TOML file + ``SYNTHNODE_*`` environment overrides, validated at start-up.

Environment overrides use ``__`` for nesting, e.g. ``SYNTHNODE_DIMSE__PORT=104``.
Settings are injected where they are needed; there is no mutable global.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from config.sections.audit import AuditSettings
from config.sections.dicomweb import DicomwebSettings
from config.sections.dimse import DimseSettings
from config.sections.engine import EngineSettings
from config.sections.pipeline import PipelineSettings
from config.sections.storage import DatabaseSettings, StorageSettings
from config.sections.watermark import WatermarkSettings

DEFAULT_CONFIG = Path(__file__).with_name("default.toml")
ENV_PREFIX = "SYNTHNODE_"


class Settings(BaseSettings):
    """All node settings. Construct through :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid"
    )

    environment: Literal["development", "production"] = "production"
    data_dir: Path = Field(default=Path("var"), description="root for index, store, keys, logs")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    dimse: DimseSettings = Field(default_factory=DimseSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    watermark: WatermarkSettings = Field(default_factory=WatermarkSettings)
    dicomweb: DicomwebSettings = Field(default_factory=DicomwebSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)

    # Set by load_settings: the file the values came from (None = defaults only).
    _source_file: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init kwargs (the parsed TOML file) < environment: env overrides the file.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _production_rules(self) -> Settings:
        if self.environment == "production" and self.dimse.accept_any_calling_ae:
            raise ValueError(
                "dimse.accept_any_calling_ae=true is allowed only with environment='development'"
            )
        return self

    # -- derived paths (one place that knows the layout of data_dir) ----------
    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{(self.data_dir / 'index.db').resolve()}"

    @property
    def store_root(self) -> Path:
        return self.storage.root or self.data_dir / "store"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def ledger_key_file(self) -> Path:
        return self.audit.key_file or self.keys_dir / "ledger.key"

    @property
    def checkpoint_file(self) -> Path:
        return self.audit.checkpoint_file or self.data_dir / "checkpoints.log"

    @property
    def watermark_key_file(self) -> Path:
        return self.watermark.key_file or self.keys_dir / "watermark.key"

    @property
    def models_dir(self) -> Path:
        if self.audit.models_dir is not None:
            return self.audit.models_dir
        return Path(__file__).resolve().parent.parent / "engine" / "weights"


@dataclass(frozen=True)
class ConfigError:
    """One bad key: dotted path and the reason."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class ConfigFileError(ValueError):
    """The configuration could not be loaded; ``errors`` names each bad key."""

    def __init__(self, source: str, errors: list[ConfigError]):
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"invalid configuration in {source}:\n{lines}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigFileError(str(path), [ConfigError("<file>", "file not found")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(
            str(path), [ConfigError("<file>", f"not valid TOML: {exc}")]
        ) from None


def _errors(exc: ValidationError) -> list[ConfigError]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append(ConfigError(loc, msg))
    return out


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Load settings from ``path`` (TOML) with environment overrides.

    ``overrides`` are top-level sections/values applied over the file (used by tests).

    Raises
    ------
    ConfigFileError
        naming every bad key with its dotted path and reason.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        data = _read_toml(path)
        source = str(path)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigFileError(source, _errors(exc)) from None
    if path is not None and not settings.data_dir.is_absolute():
        # relative data_dir is relative to the config file's folder
        settings.data_dir = (path.parent / settings.data_dir).resolve()
    settings._source_file = path
    return settings


def check_config(path: Path | str) -> list[ConfigError]:
    """Validate a config file; return every bad key (empty list = valid)."""
    try:
        load_settings(path)
    except ConfigFileError as exc:
        return exc.errors
    return []


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective settings as a JSON-able dict with secrets replaced by '***'."""

    def walk(obj: Any) -> Any:
        if isinstance(obj, SecretStr):
            return "***"
        if isinstance(obj, BaseModel):
            return {k: walk(getattr(obj, k)) for k in type(obj).model_fields}
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [walk(v) for v in obj]
        if isinstance(obj, Path):
            return str(obj)
        if hasattr(obj, "value") and not isinstance(obj, (str, int, float, bool)):
            return obj.value
        return obj

    return walk(settings)
