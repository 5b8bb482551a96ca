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
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from config.sections import Section


class ReprocessPolicy(str, Enum):
    """What a late instance does to a completed study."""

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
    # DICOM TLS for a dimse destination (BCP 195 profile): the CA that signs its
    # certificate, and this node's client certificate / key (mutual TLS)
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    max_attempts: int = Field(default=5, ge=1)
    backoff_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _complete(self) -> Destination:
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
    """Quality gate limits (node/pipeline/quality.py, which documents each check; docs/pipeline.md
    has the values measured with the shipped models)."""

    enabled: bool = True
    hu_min: float = Field(default=-1100.0, description="lowest HU a CT output may hold")
    hu_max: float = Field(default=4000.0, description="highest HU a CT output may hold")
    mr_negative_tolerance: float = Field(
        default=0.1, ge=0, le=1,
        description="MR outputs are magnitude images: the minimum may undershoot 0 by at most "
                    "this fraction of the output's 99th percentile (0 = require >= 0)")
    max_abs_bias_hu: float = Field(default=30.0, gt=0)
    max_mean_abs_residual_hu: float = Field(default=150.0, gt=0)
    min_correlation: float = Field(default=0.8, ge=-1, le=1)
    min_foreground_dice: float = Field(default=0.7, ge=0, le=1)
    # -- per slice (a slice-local failure is not averaged away by the other slices) ----------
    max_slice_abs_bias_hu: float = Field(
        default=50.0, gt=0, description="CT restoration: |mean residual| of any one slice (HU)")
    max_slice_rel_bias: float = Field(
        default=0.25, gt=0,
        description="other restoration: |mean residual| of any one slice in input-volume SDs")
    min_slice_correlation: float = Field(
        default=0.7, ge=-1, le=1, description="restoration: output/input correlation of every slice"
    )
    min_slice_edge_ratio: float = Field(
        default=0.85, gt=0,
        description="restoration: smoothed edge strength kept inside the body, output / the "
                    "input's structure (its noise share taken out), in every slice (lower = "
                    "contrast lost)")
    max_slice_edge_ratio: float = Field(
        default=1.5, gt=0, description="restoration: ... and at most this (higher = structure "
                                       "or noise the input lacks)")
    min_slice_foreground_dice: float = Field(
        default=0.5, ge=0, le=1,
        description="cross-modality: body mask overlap of every slice with foreground")
    # -- relative to the received input ------------------------------------------------------
    hu_range_margin: float = Field(
        default=200.0, ge=0,
        description="CT outputs: the field of view may span the input's own range widened by "
                    "this many HU (the absolute [hu_min, hu_max] is the least allowed)")
    max_air_shift_hu: float = Field(
        default=50.0, gt=0,
        description="CT restoration: mean change of the air around the body (HU)")
    max_background_fraction: float = Field(
        default=0.1, gt=0, le=1,
        description="MR outputs: mean outside the body at most this fraction of the body's "
                    "median (restoration: plus the input's own background mean)")

    @model_validator(mode="after")
    def _ordered(self) -> QualitySettings:
        if self.hu_min >= self.hu_max:
            raise ValueError(f"hu_min ({self.hu_min:g}) must be below hu_max ({self.hu_max:g})")
        if self.min_slice_edge_ratio >= self.max_slice_edge_ratio:
            raise ValueError(f"min_slice_edge_ratio ({self.min_slice_edge_ratio:g}) must be below "
                             f"max_slice_edge_ratio ({self.max_slice_edge_ratio:g})")
        return self


class PipelineSettings(Section):
    enabled: bool = True
    quiet_period_s: float = Field(default=30.0, gt=0)
    reprocess: ReprocessPolicy = ReprocessPolicy.REPLACE
    broker_url: str | None = Field(default=None, description="None = local worker pool")
    workers: int = Field(default=1, ge=1, le=64, description="local worker threads")
    job_max_attempts: int = Field(default=3, ge=1)
    # -- job timing (node/pipeline/jobs.py, node/pipeline/broker.py; docs/scale_out.md) ------
    lease_s: float = Field(
        default=600.0, ge=3, le=86400,
        description="a claimed job is held this long without a heartbeat before the sweeper "
                    "puts it back in the queue (its worker is presumed dead); a worker renews "
                    "the lease every lease_s / 3 while the job runs")
    poll_s: float = Field(
        default=1.0, gt=0, le=60,
        description="local worker pool: idle wait between looks at the job table (a new job "
                    "wakes the pool at once; this bounds the delay for jobs whose retry "
                    "backoff ends)")
    retry_backoff_s: float = Field(
        default=5.0, ge=0, le=3600,
        description="first wait before another attempt of a job that failed transiently "
                    "without naming its own delay; doubles per attempt (dispatch jobs use "
                    "their destination's backoff_s)")
    broker_sweep_every_s: float = Field(
        default=5.0, gt=0, le=3600,
        description="scale-out (broker_url set): period of the node's sweeper, which requeues "
                    "jobs whose lease expired and publishes queued jobs that are due")
    broker_stale_after_s: float = Field(
        default=300.0, gt=0, le=86400,
        description="scale-out: a job still queued this long after its message was published "
                    "is published again (the message was lost: broker restart, purge); "
                    "at least broker_sweep_every_s. Extra messages are harmless (a worker "
                    "ignores a job it cannot claim) but pile up if this is shorter than a "
                    "busy queue's wait")
    calling_ae: str = Field(default="SYNTHNODE", max_length=16)
    output_series_number_base: int = Field(default=9000, ge=0)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    rules: list[Rule] = Field(default_factory=list)
    destinations: list[Destination] = Field(default_factory=list)

    @field_validator("broker_stale_after_s")
    @classmethod
    def _stale_after_sweep(cls, v: float, info: ValidationInfo) -> float:
        sweep = info.data.get("broker_sweep_every_s")
        if sweep is not None and v < sweep:
            raise ValueError(f"must be at least broker_sweep_every_s ({sweep:g}): a shorter "
                             "value re-publishes every queued job on every sweep")
        return v

    @model_validator(mode="after")
    def _references(self) -> PipelineSettings:
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
