"""Study completion, routing rules, engine jobs and dispatch destinations.

Rules are evaluated in order; the first rule whose every ``match`` entry holds routes the
series (``synthnode rules test FILE...`` shows each rule's verdict and why). A ``match`` key is
one of the named fields (``called_ae``, ``calling_ae``, ``modality``, ``body_part``,
``series_description``, ``sop_class``, ``rows``, ``columns``, ``image_size``, ``instances``)
or any DICOM keyword / tag (``ProtocolName``, ``(0018,0050)``). The value is a regular
expression that must match the whole value (case-insensitive), or for numeric fields a
comparison such as ``">=256"``.
"""
from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from config.sections import Section
from pydantic import Field, model_validator


class ReprocessPolicy(str, Enum):
    """What a late instance does to a completed study (design.md 1.3)."""

    NEVER = "never"  # keep the existing synthetic series, do nothing
    ALWAYS = "always"  # process again, keep the earlier synthetic series too
    REPLACE = "replace"  # process again; the new series supersedes the earlier one


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

    @model_validator(mode="after")
    def _complete(self) -> "Destination":
        if self.kind == "dimse" and not (self.ae_title and self.host and self.port):
            raise ValueError("a dimse destination needs ae_title, host and port")
        if self.kind == "dicomweb" and not self.url:
            raise ValueError("a dicomweb destination needs url")
        return self


class TaskSpec(Section):
    task: str
    params: dict[str, Any] = Field(default_factory=dict)
    output_format: Literal["sc", "mf_word_sc", "enhanced"] = "sc"
    model: str | None = Field(default=None, description="model id; None = the task's default")
    seed: int | None = Field(default=None, description="None = derived from the job id")


class Rule(Section):
    name: str
    match: dict[str, str] = Field(default_factory=dict, description="field or keyword -> regex")
    tasks: list[TaskSpec] = Field(default_factory=list)
    destinations: list[str] = Field(default_factory=list)
    quiet_period_s: float | None = Field(default=None, gt=0)
    reprocess: ReprocessPolicy | None = None
    enabled: bool = True
    forward_originals: bool = Field(
        default=False, description="also send the matched original series to the destinations"
    )


class QualitySettings(Section):
    """Quality gate limits (node/quality.py)."""

    enabled: bool = True
    hu_min: float = -1100.0
    hu_max: float = 4000.0
    max_abs_bias_hu: float = Field(default=30.0, gt=0)
    max_mean_abs_residual_hu: float = Field(default=150.0, gt=0)
    min_correlation: float = Field(default=0.8, ge=-1, le=1)
    min_foreground_dice: float = Field(default=0.7, ge=0, le=1)


class PipelineSettings(Section):
    enabled: bool = True
    quiet_period_s: float = Field(default=30.0, gt=0)
    reprocess: ReprocessPolicy = ReprocessPolicy.REPLACE
    broker_url: str | None = Field(default=None, description="None = local worker pool")
    workers: int = Field(default=1, ge=1, le=64, description="local worker threads")
    job_max_attempts: int = Field(default=3, ge=1)
    calling_ae: str = Field(default="SYNTHNODE", max_length=16)
    output_series_number_base: int = Field(default=9000, ge=0)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    rules: list[Rule] = Field(default_factory=list)
    destinations: list[Destination] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> "PipelineSettings":
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError("destination names must be unique")
        rule_names = [r.name for r in self.rules]
        if len(set(rule_names)) != len(rule_names):
            raise ValueError("rule names must be unique")
        for rule in self.rules:
            unknown = [d for d in rule.destinations if d not in names]
            if unknown:
                raise ValueError(f"rule {rule.name!r} names unknown destination(s) {unknown}")
        return self
