"""dciodvfy (dicom3tools) as the judge of every object we write.

dicom3tools 1.00~20220618 (Debian 12) predates Synthetic Data (0008,001C), which the standard
added to the SOP Common Module later (PS3.3 C.12.1, 2024): its dictionary reports the tag as
"not a recognized standard attribute". That one message, for that one tag, is the only error
tolerated; every other "Error" line fails the test.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

#: errors caused by the validator's dictionary being older than the standard we follow
DICTIONARY_GAPS = (
    "Error - Attribute with an even group number is not a recognized standard attribute - "
    "(0x0008,0x001c)",
)


def dciodvfy_errors(path: Path | str, tool: str = "dciodvfy") -> list[str]:
    """Error lines of ``dciodvfy path``, minus the documented dictionary gaps."""
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [ln.strip() for ln in lines if ln.startswith("Error")]
    return [e for e in errors if not any(e.startswith(g) for g in DICTIONARY_GAPS)]
