"""Helpers for the query/retrieve and storage commitment tests (not a test module).

* :func:`dcmtk` finds the real DCMTK binary: pynetdicom installs Python scripts named
  ``findscu``/``getscu``/``movescu``/``storescu`` that shadow DCMTK's on PATH.
* :func:`make_ctx` builds a real :class:`~node.context.NodeContext` (migrated database,
  file store, ledger) in a temp dir; :func:`ingest` stores instances through the node's
  own ingest path; :func:`serve` runs the DIMSE server on a free loopback port.
* :func:`corpus` generates a small, fully known set of CT/MR instances.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def get_port() -> int:
    """A free TCP port on loopback (same recipe as tests/conftest.py)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

PREFIX = "1.2.826.0.1.3680043.10.1137."  # test UIDs


def dcmtk(name: str) -> str:
    """Absolute path of DCMTK's ``name`` (fails in CI / skips locally when missing)."""
    candidates = [str(Path(d) / name) for d in os.environ.get("PATH", "").split(os.pathsep)]
    candidates.insert(0, f"/usr/bin/{name}")
    for path in candidates:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return path
    if IN_CI:
        pytest.fail(f"DCMTK {name} is not installed")
    pytest.skip(f"DCMTK {name} not installed")
    raise AssertionError  # unreachable


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
    for pid, name, sn, date, time, acc, desc, series in studies:
        st_uid = f"{PREFIX}{sn}"
        for i, (mod, n) in enumerate(series, start=1):
            se_uid = f"{st_uid}.{i}"
            for k in range(1, n + 1):
                rows.append(Spec(pid, name, st_uid, date, time, acc, desc, se_uid, mod, i,
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
    from node.ingest import Ingestor

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
