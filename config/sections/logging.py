"""What the node logs per association and per stored instance (no PHI at INFO: UIDs, AE
titles, sizes and statuses only)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from config.sections import Section

Level = Literal["DEBUG", "INFO", "WARNING"]


class LogSettings(Section):
    associations: Level = Field(
        default="INFO", description="level of the one line per DIMSE association (peer, AE "
                                    "titles, accepted contexts, outcome); DEBUG hides it at INFO")
    instances: Level = Field(
        default="INFO", description="level of the one line per stored instance (UIDs, size, "
                                    "status)")
