"""Typed job specs: what an engine job and a dispatch job carry besides their columns.

A spec is validated when the job is created (:meth:`node.pipeline.jobs.JobStore.enqueue`)
and again when a worker runs it (:func:`node.pipeline.jobs.run_job`): an unknown key, a
wrong type or a missing field is refused at creation and fails the job permanently, with
the reason, at claim (a row written by another version of the node, or edited by hand).
The job's own columns (task, rule, study, series, seed, generation) are not repeated here.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["DispatchJobSpec", "EngineJobSpec", "InvalidJobSpec", "JobSpec", "parse_spec"]


class InvalidJobSpec(ValueError):
    """A job spec that does not fit its job kind's schema."""


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_json_dict(self) -> dict[str, Any]:
        """The stored form (JSON types, every field)."""
        return self.model_dump(mode="json")


class EngineJobSpec(_Spec):
    """An engine job: run the job's task on its source series, build and store the outputs,
    queue their dispatch."""

    #: the set of source instances (order-free digest of their SOP Instance UIDs)
    fingerprint: str = Field(min_length=1)
    #: task parameters from the rule (checked against the task's contract by the engine)
    params: dict[str, Any] = Field(default_factory=dict)
    output_format: Literal["sc", "mf_word_sc", "enhanced"] = "sc"
    #: model id; None = the one approved model whose manifest names the task
    model: str | None = None
    #: destinations the outputs go to (names in pipeline.destinations)
    destinations: tuple[str, ...] = ()
    #: position of the task in its rule (output series numbers)
    task_index: int = Field(default=0, ge=0)
    #: reprocess policy "replace": earlier outputs of the same series / rule / task are
    #: marked superseded once these are complete
    replace: bool = False
    #: an administrator released the quality-held outputs of job ``released_from``: this job
    #: runs the gate, records its findings and builds the outputs anyway
    released_from: str | None = None
    released_by: str | None = None
    release_reason: str | None = None


class DispatchJobSpec(_Spec):
    """A dispatch job: send the job's series to one destination."""

    destination: str = Field(min_length=1)
    #: for an original series forwarded by its rule: the set of instances sent
    fingerprint: str | None = None
    #: the series is a received original (rule forward_originals), not an output
    original: bool = False


JobSpec = EngineJobSpec | DispatchJobSpec

_SCHEMAS: dict[str, type[_Spec]] = {"engine": EngineJobSpec, "dispatch": DispatchJobSpec}


def parse_spec(kind: str, raw: JobSpec | Mapping[str, Any]) -> JobSpec:
    """The typed spec of a job of ``kind`` ("engine" or "dispatch") from its stored form.

    Raises
    ------
    InvalidJobSpec
        With the field and the reason.
    """
    schema = _SCHEMAS.get(str(kind))
    if schema is None:
        raise InvalidJobSpec(f"unknown job kind {kind!r}")
    if isinstance(raw, _Spec):
        if not isinstance(raw, schema):
            raise InvalidJobSpec(f"a {type(raw).__name__} is not a {kind} job spec")
        return raw  # type: ignore[return-value]
    try:
        return schema.model_validate(dict(raw))  # type: ignore[return-value]
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(x) for x in e.get('loc', ())) or 'spec'}: {e.get('msg', 'invalid')}"
            for e in exc.errors()
        ]
        raise InvalidJobSpec(f"invalid {kind} job spec: " + "; ".join(problems)) from None
