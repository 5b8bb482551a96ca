"""A real Orthanc server on loopback for tests and benchmarks.

``orthanc`` yields a running :class:`OrthancServer` (free DICOM and HTTP ports, temporary
storage, DicomAlwaysAllowStore, no remote access, no authentication, DICOMweb plugin when
the Debian package ``orthanc-dicomweb`` is installed; ``dicomweb_servers`` names remote
DICOMweb servers it can query, retrieve from and send to). ``stop()`` / ``start()`` restart it on
the same ports and storage (peer-down tests). The fixtures ``orthanc_factory``, ``orthanc`` and ``orthanc_dicomweb`` (tests/node/conftest.py)
start one per test.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.support.net import get_port, require_tool

PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"


def dicomweb_plugin() -> Path | None:
    """Path of Orthanc's DICOMweb plugin if installed (Debian package orthanc-dicomweb)."""
    for d in PLUGIN_DIRS:
        p = d / DICOMWEB_PLUGIN
        if p.exists():
            return p
    return None


class OrthancServer:
    """One Orthanc process bound to loopback ports chosen at start-up."""

    def __init__(
        self,
        workdir: Path,
        aet: str = "ORTHANC",
        dicomweb: bool = True,
        extra_config: dict[str, object] | None = None,
        dicomweb_servers: dict[str, object] | None = None,
    ) -> None:
        self.binary = require_tool("Orthanc")
        self.workdir = workdir
        self.aet = aet
        self.dicom_port = get_port()
        self.http_port = get_port()
        self.plugin = dicomweb_plugin() if dicomweb else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path = workdir / "orthanc.json"
        self.log_path = workdir / "orthanc.log"
        config: dict[str, object] = {
            "Name": "synthnode-test",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckCalledAet": False,
            "HttpDescribeErrors": True,
            "StableAge": 1,
            "SaveJobs": False,
            "Plugins": [str(self.plugin)] if self.plugin else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full",
                         # remote DICOMweb servers Orthanc acts as a client of
                         # (/dicom-web/servers/NAME/qido, /get, /retrieve, /stow)
                         "Servers": dicomweb_servers or {}},
        }
        config.update(extra_config or {})
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(config, indent=2))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 30.0) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "--logfile=" + str(self.log_path), str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/system", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("Orthanc did not start in time")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.proc = None

    # -- REST helpers ------------------------------------------------------------------
    def get(self, path: str) -> object:
        r = httpx.get(self.url + path, timeout=10.0)
        r.raise_for_status()
        return r.json()

    def instance_uids(self) -> set[str]:
        """SOP Instance UIDs of every stored instance."""
        r = httpx.post(
            self.url + "/tools/find",
            json={"Level": "Instance", "Query": {}, "Expand": True},
            timeout=30.0,
        )
        r.raise_for_status()
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in r.json()}

    def post(self, path: str, body: object, timeout: float = 60.0) -> object:
        r = httpx.post(self.url + path, json=body, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def statistics(self) -> dict[str, object]:
        return self.get("/statistics")  # type: ignore[return-value]

    def instance_file(self, sop_uid: str) -> bytes:
        r = httpx.post(
            self.url + "/tools/lookup", content=sop_uid, timeout=10.0
        )
        r.raise_for_status()
        (hit,) = [h for h in r.json() if h["Type"] == "Instance"]
        f = httpx.get(self.url + f"/instances/{hit['ID']}/file", timeout=30.0)
        f.raise_for_status()
        return f.content
