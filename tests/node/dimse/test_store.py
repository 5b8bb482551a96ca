"""C-STORE SCP: durable store, index + ledger, duplicates, malformed input, out of space.

Real peers: DCMTK storescu / dcmsend and pynetdicom as SCU, the node on a free loopback
port in this process.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.dicom.part10 import split_part10
from node.dimse.status import General, Storage
from tests.support.dimse import dcmtk, ledger_events, scu_store, write_part10

pytestmark = pytest.mark.dcmtk

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")


def _storescu(node: Any, *files: Path | str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    host, port = node.address
    return subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "SYNTHNODE", *extra,
                           host, str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def _encode(ds: pydicom.Dataset) -> bytes:
    """The data set (no file meta) in explicit VR little endian."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _copy_with_new_uid(src: str, dst: Path, **changes: Any) -> pydicom.Dataset:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(dst, enforce_file_format=True)
    return ds


def test_storescu_stores_indexes_and_records(start_node: Any, tmp_path: Path) -> None:
    node = start_node()
    seen: list[Any] = []
    node.ctx.on_instance_stored.append(seen.append)
    r = _storescu(node, CT)
    assert r.returncode == 0, r.stderr
    src = pydicom.dcmread(CT)
    row = node.ctx.index.get_instance(src.SOPInstanceUID)
    assert row is not None
    assert row.study_instance_uid == src.StudyInstanceUID
    assert row.series_instance_uid == src.SeriesInstanceUID
    assert row.calling_ae == "STORESCU"
    path = node.ctx.store.path(row.file_path)
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == row.sha256 and len(data) == row.file_size
    assert pydicom.dcmread(path).pixel_array.shape == (128, 128)
    (ev,) = ledger_events(node, "instance.received")
    assert ev.subject["sop_uid"] == src.SOPInstanceUID
    assert ev.payload["sha256"] == row.sha256 and ev.payload["result"] == "stored"
    assert [s.sop_instance_uid for s in seen] == [src.SOPInstanceUID]
    # no PHI in the ledger leaf: the patient's name appears nowhere in it
    assert str(src.PatientName) not in repr(ev)


def test_stored_bytes_are_the_sent_bytes(start_node: Any) -> None:
    """pynetdicom sends the file's data set bytes unchanged: the stored file's data set
    must be byte-for-byte the source file's (storescu re-encodes, see the corpus test).
    Some of these share a SOP Instance UID, hence ``replace``."""
    node = start_node(dimse={"duplicate_policy": "replace"})
    for src in (CT, MR, get_testdata_file("JPEG2000.dcm"), get_testdata_file("MR_small_RLE.dcm")):
        assert scu_store(node.address, [Path(src)]) == [0]
        meta, src_body = split_part10(Path(src).read_bytes())
        row = node.ctx.index.get_instance(str(meta.MediaStorageSOPInstanceUID))
        assert row is not None and row.transfer_syntax_uid == str(meta.TransferSyntaxUID)
        stored_meta, body = split_part10(node.ctx.store.read(row.file_path))
        assert body == src_body
        assert stored_meta.TransferSyntaxUID == meta.TransferSyntaxUID


def test_identical_resend_is_success_without_second_copy(start_node: Any) -> None:
    node = start_node()
    for _ in range(2):
        r = _storescu(node, CT)
        assert r.returncode == 0, r.stderr
    assert node.ctx.index.count_instances() == 1
    assert len(list(node.ctx.store.iter_files())) == 1
    results = [e.payload["result"] for e in ledger_events(node, "instance.received")]
    assert results == ["stored", "identical_duplicate"]


@pytest.mark.parametrize("policy,status", [
    ("reject", General.DUPLICATE_SOP_INSTANCE),
    ("keep_first", Storage.ELEMENTS_DISCARDED),
    ("replace", Storage.SUCCESS),
])
def test_duplicate_policy(start_node: Any, tmp_path: Path, policy: str, status: int) -> None:
    node = start_node(dimse={"duplicate_policy": policy})
    first = tmp_path / "a.dcm"
    ds = _copy_with_new_uid(CT, first)
    second = tmp_path / "b.dcm"
    ds.SeriesDescription = "changed content"
    ds.save_as(second, enforce_file_format=True)
    assert scu_store(node.address, [first]) == [0]
    (old,) = node.ctx.index.instances()
    assert scu_store(node.address, [second]) == [int(status)]
    (now,) = node.ctx.index.instances()
    files = list(node.ctx.store.iter_files())
    assert len(files) == 1, "one copy per SOP Instance in the store"
    if policy == "replace":
        assert now.sha256 != old.sha256 and now.file_path == files[0]
        assert pydicom.dcmread(node.ctx.store.path(now.file_path)).SeriesDescription == "changed content"
    else:
        assert now.sha256 == old.sha256 and now.file_path == files[0]
        rej = ledger_events(node, "instance.rejected")
        assert rej and rej[-1].payload["reason"] == "duplicate_conflict"


def _malformed(tmp_path: Path) -> dict[str, tuple[Path, int]]:
    src = pydicom.dcmread(CT)
    cls, ts = str(src.SOPClassUID), ExplicitVRLittleEndian
    body = _encode(src)
    out: dict[str, tuple[Path, int]] = {}
    uid = generate_uid()
    src.SOPInstanceUID = uid
    out["truncated"] = (write_part10(tmp_path / "trunc.dcm", _encode(src)[:-1000], cls, uid, ts),
                        Storage.CANNOT_UNDERSTAND)
    uid = generate_uid()
    out["garbage"] = (write_part10(tmp_path / "garbage.dcm",
                                   bytes(range(256)) * 40, cls, uid, ts),
                      Storage.CANNOT_UNDERSTAND)
    no_uid = pydicom.dcmread(CT)
    del no_uid.SOPInstanceUID
    out["missing_sop_instance_uid"] = (
        write_part10(tmp_path / "nouid.dcm", _encode(no_uid), cls, generate_uid(), ts),
        Storage.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    mr_as_ct = pydicom.dcmread(MR)  # an MR data set sent as CT Image Storage
    mr_as_ct.SOPInstanceUID = uid = generate_uid()
    out["contradicts_sop_class"] = (
        write_part10(tmp_path / "mr_as_ct.dcm", _encode(mr_as_ct), cls, uid, ts),
        Storage.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    nopix = pydicom.dcmread(CT)
    del nopix.PixelData
    nopix.SOPInstanceUID = uid = generate_uid()
    out["image_without_pixel_data"] = (
        write_part10(tmp_path / "nopix.dcm", _encode(nopix), cls, uid, ts),
        Storage.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    assert body  # the intact encoding is not empty (sanity of the helper)
    return out


def test_malformed_input_gets_failure_status_and_node_keeps_serving(
        start_node: Any, tmp_path: Path) -> None:
    node = start_node()
    cases = _malformed(tmp_path)
    for name, (path, status) in cases.items():
        # each on its own association, then a good object on the next one
        got = scu_store(node.address, [path])
        assert got == [int(status)], name
        good = tmp_path / f"good_{name}.dcm"
        _copy_with_new_uid(CT, good)
        assert scu_store(node.address, [good]) == [0], f"node stopped serving after {name}"
    assert node.ctx.index.count_instances() == len(cases)
    rejected = ledger_events(node, "instance.rejected")
    assert len(rejected) == len(cases)
    assert {e.payload["reason"] for e in rejected} == {
        "unparseable", "missing_attribute", "sop_class_mismatch"}
    assert not list(node.ctx.store.temp_dir.iterdir())
    # several bad objects on ONE association: every one answered, the association lives
    statuses = scu_store(node.address, [p for p, _ in cases.values()])
    assert statuses == [int(s) for _, s in cases.values()]


def test_out_of_space_is_a700(start_node: Any, tmp_path: Path) -> None:
    import shutil

    node = start_node()
    node.ctx.store.min_free_bytes = shutil.disk_usage(node.ctx.store.root).free + 1
    f = tmp_path / "x.dcm"
    _copy_with_new_uid(CT, f)
    assert scu_store(node.address, [f]) == [int(Storage.OUT_OF_RESOURCES)]
    assert node.ctx.index.count_instances() == 0
    assert not list(node.ctx.store.iter_files())
    (ev,) = ledger_events(node, "instance.rejected")
    assert ev.payload["reason"] == "out_of_space"
    node.ctx.store.min_free_bytes = 0
    assert scu_store(node.address, [f]) == [0]


def test_storescu_many_files_one_association(start_node: Any, tmp_path: Path) -> None:
    node = start_node()
    files = []
    for i in range(20):
        f = tmp_path / f"s{i}.dcm"
        _copy_with_new_uid(CT, f, InstanceNumber=i + 1)
        files.append(f)
    r = _storescu(node, *files)
    assert r.returncode == 0, r.stderr
    rows = node.ctx.index.instances()
    assert len(rows) == 20
    assert sorted(pydicom.dcmread(node.ctx.store.path(r_.file_path)).InstanceNumber
                  for r_ in rows) == list(range(1, 21))


def test_store_on_sqlite_and_postgresql(start_node: Any, db_url: str, tmp_path: Path) -> None:
    """The whole ingest path (index rows + ledger in one transaction) on both databases,
    with 4 associations at once delivering the first instances of one study."""
    import threading

    node = start_node(database={"url": db_url})
    files = []
    for i in range(16):
        f = tmp_path / f"p{i}.dcm"
        _copy_with_new_uid(CT, f, InstanceNumber=i + 1)
        files.append(f)
    results: list[list[int | None]] = []

    def send(chunk: list[Path]) -> None:
        results.append(scu_store(node.address, chunk))

    threads = [threading.Thread(target=send, args=(files[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s for r in results for s in r) == [0] * 16
    assert node.ctx.index.count_instances() == 16
    (study,) = node.ctx.index.studies()
    assert study.n_instances == 16 and study.n_series == 1
    assert len(ledger_events(node, "instance.received")) == 16
