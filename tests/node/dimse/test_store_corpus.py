"""Every real file in pydicom and pydicom-data that DCMTK can send is stored bit-identical.

Definition used here ("bit-identical"): DCMTK's ``dcmsend`` (no decompression, ``-dn``)
sends each corpus file to the node and, with the same command line, to DCMTK's
``storescp --bit-preserving`` (which writes the received data set bytes unchanged). For
every file that storescp received, the node either

* stored a file whose data set bytes (everything after the File Meta Information) equal
  the bytes storescp received, in the same transfer syntax; and where that transfer
  syntax is the source file's, also equal to the source file's data set bytes whenever
  storescp's are (DCMTK re-encodes some files while sending: e.g. fixing odd lengths); or
* refused it with a failure status (and an ``instance.rejected`` ledger entry), and
  pydicom (an independent parser) confirms the file is not a storable instance: an image
  SOP class without Pixel Data, a missing SOP Instance / Study / Series Instance UID, or
  file meta naming another SOP Class / Instance than the data set (DCMTK then sends the
  data set's class on the file meta's presentation context), or an IS / DS value that is
  not a number.

Files that share a SOP Instance UID are sent in separate rounds (duplicate policy
``replace``) so each round's stored copy can be compared.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import UID

from node.dicom.part10 import split_part10
from tests.support.net import get_port
from tests.support.dimse import dcmtk

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]


def corpus() -> list[Path]:
    """DICOM files (PS3.10, 'DICM' prefix) shipped in pydicom and pydicom-data."""
    roots = [Path(pydicom.data.__file__).parent]
    try:
        import data_store  # the pydicom-data package

        roots.append(Path(data_store.__file__).parent)
    except ImportError:
        pass
    files = []
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.stat().st_size > 132:
                with p.open("rb") as fh:
                    if fh.read(132)[128:132] == b"DICM":
                        files.append(p)
    return files


def _sop_uid(p: Path) -> str:
    try:
        meta, _ = split_part10(p.read_bytes())
        return str(meta.get("MediaStorageSOPInstanceUID", "")) or p.name
    except Exception:
        return p.name


def _all_uids(p: Path) -> set[str]:
    """The file meta's and the data set's SOP Instance UID."""
    uids = {_sop_uid(p)}
    try:
        uids.add(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID))
    except Exception:
        pass
    return {u for u in uids if u}


def _not_storable(p: Path) -> str | None:
    """Why pydicom says this file is not a storable instance (None: it is)."""
    try:
        ds = pydicom.dcmread(p)
    except Exception as exc:
        return f"unreadable: {exc}"
    for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not str(ds.get(kw, "") or "").strip():
            return f"{kw} missing"
    meta = ds.file_meta
    if (str(meta.get("MediaStorageSOPClassUID", "")) != str(ds.SOPClassUID)
            or str(meta.get("MediaStorageSOPInstanceUID", "")) != str(ds.SOPInstanceUID)):
        return "file meta contradicts the data set (SOP Class / Instance UID)"
    for elem in ds.iterall():  # numbers that are not numbers (e.g. Number of Frames "1A")
        if elem.VR in ("IS", "DS") and elem.value not in (None, ""):
            for v in (elem.value if elem.VM > 1 else [elem.value]):
                try:
                    float(str(v))
                except ValueError:
                    return f"{elem.keyword or elem.tag} is not a number: {v!r}"
    name = UID(str(ds.SOPClassUID)).name
    if name.endswith("Image Storage") and not any(
            k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return "image without pixel data"
    return None


@pytest.fixture
def storescp(tmp_path: Path) -> Any:
    out = tmp_path / "storescp"
    out.mkdir()
    port = get_port()
    proc = subprocess.Popen(
        [dcmtk("storescp"), "--bit-preserving", "+xa", "-aet", "SYNTHNODE", "-od", str(out),
         str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    yield out, port
    proc.terminate()
    proc.wait(10)


def _dcmsend(port: int, files: list[Path]) -> None:
    subprocess.run([dcmtk("dcmsend"), "-aet", "STORESCU", "-aec", "SYNTHNODE", "-dn", "-nuc",
                    "--no-halt", "127.0.0.1", str(port), *map(str, files)],
                   capture_output=True, text=True, timeout=300)


def test_corpus_stored_bit_identical(start_node: Any, storescp: Any) -> None:
    files = corpus()
    assert len(files) > 100, "pydicom-data is missing: scripts/setup --test installs it"
    # no two files of one round share a SOP Instance UID, in the file meta or the data
    # set (DCMTK sends the data set's; some test files' meta names another instance)
    rounds: list[list[Path]] = []
    round_uids: list[set[str]] = []
    for f in files:
        uids = _all_uids(f)
        for i, taken in enumerate(round_uids):
            if not taken & uids:
                rounds[i].append(f)
                taken |= uids
                break
        else:
            rounds.append([f])
            round_uids.append(set(uids))

    node = start_node(dimse={"duplicate_policy": "replace"})
    ref_dir, ref_port = storescp
    n_identical = n_source_identical = n_refused = 0
    problems: list[str] = []
    refused_before: dict[str, int] = {}
    for batch in rounds:
        for p in ref_dir.iterdir():
            p.unlink()
        _dcmsend(ref_port, batch)
        _dcmsend(node.address[1], batch)
        received: dict[str, Path] = {}
        for p in ref_dir.iterdir():
            meta, _ = split_part10(p.read_bytes())
            received[str(meta.MediaStorageSOPInstanceUID)] = p
        for f in batch:
            uid = _sop_uid(f)
            ref = received.get(uid)
            if ref is None:
                continue  # DCMTK could not send this file
            ref_meta, ref_body = split_part10(ref.read_bytes())
            refusals = len(node.ctx.ledger.query(uids=sorted(_all_uids(f)),
                                                 event_types=["instance.rejected"]))
            row = node.ctx.index.get_instance(uid)
            if refusals > refused_before.get(uid, 0):
                refused_before[uid] = refusals
                why = _not_storable(f)
                if why is None:
                    problems.append(f"{f.name}: refused, but pydicom finds it storable")
                else:
                    n_refused += 1
                continue
            if row is None:
                problems.append(f"{f.name}: neither stored nor refused")
                continue
            stored_meta, body = split_part10(node.ctx.store.read(row.file_path))
            if (body != ref_body
                    or stored_meta.TransferSyntaxUID != ref_meta.TransferSyntaxUID):
                problems.append(f"{f.name}: stored bytes differ from what DCMTK sent")
                continue
            n_identical += 1
            src_meta, src_body = split_part10(f.read_bytes())
            if ref_body == src_body:
                n_source_identical += 1
    print(f"\ncorpus: {len(files)} files, {n_identical} stored bit-identical "
          f"({n_source_identical} also equal to the source file's data set), "
          f"{n_refused} refused as not storable")
    assert not problems, "\n".join(problems)
    assert n_identical > 50
    assert not list(node.ctx.store.temp_dir.iterdir())
    shutil.rmtree(ref_dir, ignore_errors=True)
