"""One module per settings section, each owned by the part of the node that reads it."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base for every settings section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")
