"""Settings root: TOML file + ``SYNTHNODE_*`` environment overrides, validated at start-up.

Environment overrides use ``__`` for nesting, e.g. ``SYNTHNODE_DIMSE__PORT=104``.
Settings are injected where they are needed; there is no mutable global.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from config.locate import key_line
from config.sections.audit import AuditSettings
from config.sections.dicomweb import DicomwebSettings
from config.sections.dimse import DimseSettings
from config.sections.engine import EngineSettings
from config.sections.ingest import IngestSettings
from config.sections.logging import LogSettings
from config.sections.pipeline import PipelineSettings
from config.sections.storage import DatabaseSettings, StorageSettings
from config.sections.watermark import WatermarkSettings

DEFAULT_CONFIG = Path(__file__).with_name("default.toml")
ENV_PREFIX = "SYNTHNODE_"


def user_data_dir() -> Path:
    """Where a node run without a config file keeps its data: ``$XDG_DATA_HOME/synthnode``,
    by default ``~/.local/share/synthnode`` (XDG Base Directory Specification)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "synthnode"


class Settings(BaseSettings):
    """All node settings. Construct through :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid"
    )

    environment: Literal["development", "production"] = "production"
    data_dir: Path = Field(default=Path("var"), description="root for index, store, keys, logs")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field(
        default="text", description="json: one JSON object per log line, with the DIMSE "
                                    "association, job and study where known")
    logging: LogSettings = Field(default_factory=LogSettings)
    dimse: DimseSettings = Field(default_factory=DimseSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
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
    def cache_dir(self) -> Path:
        """Rebuildable documents derived from stored files (DICOM JSON metadata ...)."""
        return self.data_dir / "cache"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def ledger_key_file(self) -> Path:
        return self.audit.key_file or self.keys_dir / "ledger.key"

    @property
    def patient_key_file(self) -> Path:
        return self.audit.patient_key_file or self.keys_dir / "patient.key"

    @property
    def syslog_cursor_file(self) -> Path:
        return self.audit.syslog.cursor_file or self.data_dir / "syslog-feed.cursor"

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
    """One bad key: dotted path, the reason, and where it is written.

    ``line`` is the 1-based line of the key in the file (None when unknown or when the
    problem is the file itself); ``hint`` a suggestion such as ``did you mean 'ae_title'?``.
    """

    path: str
    reason: str
    line: int | None = None
    hint: str | None = None

    def __str__(self) -> str:
        text = f"{self.path}: {self.reason}" if self.path else self.reason
        return f"{text} ({self.hint})" if self.hint else text

    def located(self, source: str) -> str:
        """``FILE:LINE: path: reason (hint)``, the form editors and terminals jump to."""
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self}"


class ConfigFileError(ValueError):
    """The configuration could not be loaded; ``errors`` names each bad key."""

    def __init__(self, source: str, errors: list[ConfigError]):
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {e.located(source)}" for e in errors)
        super().__init__(f"invalid configuration in {source}:\n{lines}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigFileError(str(path), [ConfigError("", "no such file")]) from None
    except IsADirectoryError:
        raise ConfigFileError(str(path), [ConfigError("", "is a folder, not a file")]) from None
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigFileError(
            str(path), [ConfigError("", f"not valid TOML: {exc}", int(m.group(1)) if m else None)]
        ) from None


def fields_at(path: list[str]) -> list[str] | None:
    """The keys allowed in the table at ``path`` (dotted parts, list indexes as numbers),
    or None when that table takes free keys (e.g. a rule's ``match``)."""
    model: type[BaseModel] | None = Settings
    for part in path:
        if part.isdigit():
            continue
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        model = _inner_model(field.annotation)
    return sorted(model.model_fields) if model is not None else None


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds (directly, in a list, or optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """``did you mean 'x'?`` for the closest of ``choices`` (None when nothing is close)."""
    close = difflib.get_close_matches(word, list(choices), n=2, cutoff=0.6)
    if not close:
        return None
    return "did you mean " + " or ".join(repr(c) for c in close) + "?"


def _errors(exc: ValidationError, text: str | None = None) -> list[ConfigError]:
    out = []
    for err in exc.errors():
        parts = [str(p) for p in err["loc"]]
        loc = ".".join(parts) or "<root>"
        msg = err["msg"]
        hint = None
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            allowed = fields_at(parts[:-1])
            if allowed:
                hint = did_you_mean(parts[-1], allowed)
        elif err["type"] == "missing":
            msg = "required key missing"
        msg = msg.removeprefix("Value error, ")
        where = list(parts)
        if m := re.search(r"used by entries \d+ and (\d+)", msg):  # a list's duplicate entry
            where += [m.group(1), "name"]
        line = key_line(text, where) if text and parts else None
        out.append(ConfigError(loc, msg, line, hint))
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
    text: str | None = None
    if path is not None:
        path = Path(path)
        data = _read_toml(path)
        source = str(path)
        text = path.read_text(encoding="utf-8", errors="replace")
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigFileError(source, _errors(exc, text)) from None
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


_URL_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@\s]*@", re.IGNORECASE)


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective settings as a JSON-able dict with secrets replaced by '***'."""

    def walk(obj: Any) -> Any:
        if isinstance(obj, SecretStr):
            return "***"
        if isinstance(obj, str):
            return _URL_PASSWORD.sub(r"\1***@", obj)  # postgresql://user:secret@host
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


def effective_text(settings: Settings) -> str:
    """The effective settings (file + environment + defaults), secrets redacted, as one
    ``dotted.key = value`` line per setting (values in TOML / JSON notation), for the log and
    ``synthnode config show``."""
    lines: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif (isinstance(value, list) and value
              and all(isinstance(v, dict) for v in value)):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)
        else:
            lines.append(f"{prefix} = {json.dumps(value, default=str, ensure_ascii=False)}")

    walk("", redacted(settings))
    return "\n".join(lines)
