"""A real node and real DIMSE peers for tests and benchmarks.

* :func:`dcmtk` finds the real DCMTK binary: pynetdicom installs Python scripts named
  ``findscu`` / ``getscu`` / ``movescu`` / ``storescu`` that shadow DCMTK's on PATH.
  Missing tool: failure in CI, skip locally.
* :func:`node_settings_dict` is the settings of a test node (TOML-serialisable): calling AE
  titles STORESCU, ECHOSCU, FINDSCU, GETSCU, MOVESCU, TESTSCU (any host), called AE title
  SYNTHNODE, pipeline disabled unless ``pipeline={"enabled": True, ...}``.
* :class:`NodeProcess` runs ``synthnode serve`` in a subprocess.
* :func:`scu_store` sends files' data set bytes unchanged (pynetdicom) and returns the
  statuses; :func:`write_part10` wraps raw (possibly malformed) data set bytes in a valid
  file meta; :func:`ledger_events` lists a node's ledger events.
* Query / retrieve helpers: :data:`SPECS` and :func:`make_dataset` (a small, fully known
  set of CT / MR instances), :func:`make_ctx` (a real :class:`~node.context.NodeContext` in
  a temp dir), :func:`ingest` (through the node's own ingest path), :func:`serve` (the
  DIMSE server on a free loopback port), :func:`dcmtk_storescp`, :func:`run_tool`.
"""
from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from tests.support.net import IN_CI, get_port

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PEERS = ["STORESCU", "ECHOSCU", "FINDSCU", "GETSCU", "MOVESCU", "TESTSCU"]
_DCMTK_DIRS = ("/usr/bin", "/usr/local/bin", "/opt/dcmtk/bin")


def dcmtk(name: str) -> str:
    """Path of the DCMTK executable ``name`` (not a same-named pynetdicom app)."""
    candidates = [str(Path(d) / name) for d in _DCMTK_DIRS]
    which = shutil.which(name)
    if which:
        candidates.append(which)
    for c in candidates:
        if not os.access(c, os.X_OK):
            continue
        try:
            out = subprocess.run([c, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return c
    if IN_CI:
        pytest.fail(f"DCMTK {name} is not installed (scripts/test installs it)")
    pytest.skip(f"DCMTK {name} not installed")
    raise AssertionError  # unreachable


def node_settings_dict(data_dir: Path, port: int, **overrides: Any) -> dict[str, Any]:
    """Settings for a test node (plain dict; TOML-serialisable)."""
    d: dict[str, Any] = {
        "environment": "development",
        "data_dir": str(data_dir),
        "log_level": "INFO",
        "dimse": {
            "ae_title": "SYNTHNODE",
            "bind_address": "127.0.0.1",
            "port": port,
            "allowed_peers": [{"ae_title": a} for a in DEFAULT_PEERS],
            "max_associations": 16,
            "acse_timeout_s": 10,
            "dimse_timeout_s": 30,
            "network_timeout_s": 30,
        },
        "storage": {"min_free_bytes": 0},
        # DIMSE tests run without the pipeline; pipeline tests pass pipeline={...}
        "pipeline": {"enabled": False},
        # DIMSE tests run without the DICOMweb server; DICOMweb tests pass
        # dicomweb={"enabled": True, "port": 0, ...}
        "dicomweb": {"enabled": False, "port": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(d.get(key), dict):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    return d


@dataclass
class NodeProcess:
    """``synthnode serve`` in a subprocess."""

    config: Path
    data_dir: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    def start(self, timeout: float = 60.0) -> NodeProcess:
        log = self.log.with_name(f"{self.log.stem}.{len(self.logs)}.log")
        self.logs.append(log)
        fh = log.open("wb")
        env = {**os.environ, "PYTHONPATH": str(REPO), "SYNTHNODE_CONFIG": str(self.config)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from node.cli import main; "
             "sys.argv[0] = 'synthnode'; main()", "serve", "--config", str(self.config),
             "--grace", "10"],
            stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env,
        )
        fh.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"synthnode: listening" in log.read_bytes():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited ({self.proc.returncode}):\n"
                                   + log.read_text(errors="replace")[-4000:])
            time.sleep(0.1)
        self.kill()
        raise RuntimeError("node did not start in time:\n" + log.read_text(errors="replace"))

    def output(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> NodeProcess:
        self.kill()
        return self.start()


def write_part10(path: Path, dataset_bytes: bytes, sop_class: str, sop_instance: str,
                 transfer_syntax: str) -> Path:
    """Write raw data set bytes behind a valid File Meta header (to send malformed data)."""
    from node.dicom.part10 import build_part10

    path.write_bytes(build_part10(dataset_bytes, sop_class, sop_instance, transfer_syntax))
    return path


def scu_store(address: tuple[str, int], files: list[Path], *, calling: str = "TESTSCU",
              called: str = "SYNTHNODE") -> list[int | None]:
    """Send each file's data set bytes unchanged (pynetdicom, chunked from the file) on one
    association; returns each C-STORE status (None: no response). Raises if refused."""
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE, _config

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    seen: set[tuple[str, str]] = set()
    for f in files:
        m = read_file_meta_info(f)
        key = (str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID))
        if key not in seen:
            seen.add(key)
            ae.add_requested_context(*key)
    assoc = ae.associate(address[0], address[1], ae_title=called)
    if not assoc.is_established:
        raise ConnectionRefusedError("association refused")
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    out: list[int | None] = []
    try:
        for f in files:
            rsp = assoc.send_c_store(f)
            out.append(getattr(rsp, "Status", None))
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    return out


def ledger_events(node: Any, type_: str | None = None) -> list[Any]:
    """Events in a node's ledger (optionally of one type), oldest first."""
    evs = [e.event for e in node.ctx.ledger.entries()]
    return [e for e in evs if type_ is None or getattr(e.type, "value", e.type) == type_]


PREFIX = "1.2.826.0.1.3680043.10.1137."  # test UIDs


@dataclass(frozen=True)
class Spec:
    """One generated instance (the facts the tests assert against)."""

    patient_id: str
    patient_name: str
    study_uid: str
    study_date: str
    study_time: str
    accession: str
    study_description: str
    series_uid: str
    modality: str
    series_number: int
    sop_uid: str
    instance_number: int


def _spec_rows() -> list[Spec]:
    rows: list[Spec] = []
    studies = [
        # patient id, name, study n, date, time, accession, description, [(modality, n_inst)]
        ("QR1", "Doe^John", 1, "20200101", "083000", "A1", "CT CHEST", [("CT", 3), ("CT", 2)]),
        ("QR1", "Doe^John", 2, "20200615", "140500", "A2", "MR BRAIN", [("MR", 2)]),
        ("QR2", "Roe^Jane", 3, "20211231", "235959", "A3", "CT ABDOMEN", [("CT", 2), ("MR", 1)]),
    ]
    for pid, name, sn, date, tm, acc, desc, series in studies:
        st_uid = f"{PREFIX}{sn}"
        for i, (mod, n) in enumerate(series, start=1):
            se_uid = f"{st_uid}.{i}"
            for k in range(1, n + 1):
                rows.append(Spec(pid, name, st_uid, date, tm, acc, desc, se_uid, mod, i,
                                 f"{se_uid}.{k}", k))
    return rows


SPECS: list[Spec] = _spec_rows()


def make_dataset(spec: Spec) -> Dataset:
    """A small but valid CT / MR Image instance for ``spec`` (8x8, 16-bit)."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage if spec.modality == "CT" else MRImageStorage
    ds.SOPInstanceUID = spec.sop_uid
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.FrameOfReferenceUID = spec.study_uid + ".9"
    ds.PatientID = spec.patient_id
    ds.PatientName = spec.patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = spec.study_date
    ds.StudyTime = spec.study_time
    ds.AccessionNumber = spec.accession
    ds.StudyID = spec.accession
    ds.StudyDescription = spec.study_description
    ds.ReferringPhysicianName = ""
    ds.Modality = spec.modality
    ds.SeriesNumber = spec.series_number
    ds.InstanceNumber = spec.instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0, 0, float(spec.instance_number)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    ds.SliceThickness = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 8
    ds.Columns = 8
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if spec.modality == "CT":
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.KVP = 120
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = 10
        ds.RepetitionTime = 500
        ds.EchoTrainLength = 1
    rng = np.random.default_rng(abs(hash(spec.sop_uid)) % 2**32)
    ds.PixelData = rng.integers(-1000, 1000, size=(8, 8), dtype=np.int16).tobytes()
    return ds


def part10(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def make_ctx(tmp_path: Path, db_url: str, **dimse: Any) -> Any:
    """A NodeContext on a migrated database with a file store and ledger under ``tmp_path``."""
    from audit.ledger import Ledger
    from config.settings import load_settings
    from node.context import NodeContext
    from node.db import make_engine, upgrade
    from storage.filestore import FileStore
    from storage.index import Index

    dimse_cfg: dict[str, Any] = {
        "ae_title": "SYNTHNODE",
        "bind_address": "127.0.0.1",
        "port": get_port(),
        "allowed_peers": [{"ae_title": a} for a in ("FINDSCU", "GETSCU", "MOVESCU", "STORESCU",
                                                    "ECHOSCU", "COMMITSCU")],
    }
    dimse_cfg.update(dimse)
    settings = load_settings(None, data_dir=str(tmp_path / "data"), dimse=dimse_cfg,
                             database={"url": db_url})
    upgrade(db_url)
    engine = make_engine(db_url)
    store = FileStore(settings.store_root, fsync=False)
    return NodeContext(settings=settings, engine=engine, store=store, index=Index(engine),
                       ledger=Ledger(engine))


def ingest(ctx: Any, datasets: Sequence[Dataset]) -> None:
    """Store ``datasets`` through the node's ingest path (as STOW-RS would)."""
    from node.ingest.ingestor import Ingestor

    ing = Ingestor(ctx)
    for ds in datasets:
        ing.ingest_part10(part10(ds), calling_ae="STORESCU", source="dimse")


@contextmanager
def serve(ctx: Any, services: Sequence[Any] | None = None) -> Iterator[int]:
    """Run the node's DIMSE server (all default services) on its configured port."""
    from node.dimse.server import DimseServer

    server = DimseServer(ctx, services)
    _host, port = server.start()
    try:
        yield port
    finally:
        server.stop(grace_s=5)


def run_tool(args: Sequence[str], cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool; output (stdout+stderr) is in ``.stdout``."""
    return subprocess.run(list(args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


@contextmanager
def dcmtk_storescp(out_dir: Path, ae_title: str = "STORESCP") -> Iterator[int]:
    """DCMTK storescp on a free loopback port writing into ``out_dir``."""
    port = get_port()
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", ae_title, "-od", str(out_dir), "--accept-all", "-uf",
         str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_port(port: int, timeout: float = 10) -> None:
    import socket
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


def which_or_skip(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed")
    return path
