"""Typed settings for synthnode (pydantic-settings).

This package imports no other project package (import direction:
node -> {engine, storage, audit} -> config).
"""
from __future__ import annotations

from config.settings import (
    ConfigError,
    Settings,
    check_config,
    load_settings,
    redacted,
)

__all__ = ["ConfigError", "Settings", "check_config", "load_settings", "redacted"]
