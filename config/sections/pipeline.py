"""Study completion, routing rules and dispatch destinations."""
from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from config.sections import Section
from pydantic import Field


class ReprocessPolicy(str, Enum):
    NEVER = "never"
    ALWAYS = "always"
    REPLACE = "replace"


class Destination(Section):
    name: str
    kind: Literal["dimse", "dicomweb"]
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    url: str | None = None
    accepts_synthetic: bool = False
    max_attempts: int = Field(default=5, ge=1)
    backoff_s: float = Field(default=5.0, gt=0)


class TaskSpec(Section):
    task: str
    params: dict[str, Any] = Field(default_factory=dict)
    output_format: Literal["sc", "mf_word_sc", "enhanced"] = "sc"


class Rule(Section):
    name: str
    match: dict[str, str] = Field(default_factory=dict, description="field or keyword -> regex")
    tasks: list[TaskSpec] = Field(default_factory=list)
    destinations: list[str] = Field(default_factory=list)
    quiet_period_s: float | None = Field(default=None, gt=0)


class PipelineSettings(Section):
    enabled: bool = True
    quiet_period_s: float = Field(default=30.0, gt=0)
    reprocess: ReprocessPolicy = ReprocessPolicy.REPLACE
    broker_url: str | None = Field(default=None, description="None = local worker pool")
    rules: list[Rule] = Field(default_factory=list)
    destinations: list[Destination] = Field(default_factory=list)
