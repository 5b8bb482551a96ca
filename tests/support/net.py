"""Loopback ports, polling and external tools for tests and benchmarks."""
from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable

import pytest

__all__ = ["IN_CI", "get_port", "require_tool", "wait_for"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def get_port() -> int:
    """A free TCP port on loopback (bind to 0 and release, as pynetdicom's tests do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], object], timeout: float, what: str, every: float = 0.5) -> object:
    """Poll ``pred`` until it returns something truthy (returned) or ``timeout`` seconds pass
    (AssertionError naming ``what``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def require_tool(name: str) -> str:
    """Path of an external tool; in CI a missing tool is a failure, locally a skip."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is not installed (scripts/test installs it)")
        pytest.skip(f"{name} not installed")
    return path
