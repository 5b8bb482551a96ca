"""The malformed / hostile corpus (tests/support/malformed.py) sent to a real node over
DIMSE: every malformed file gets the failure status of its expected reason, a ledger
refusal and nothing stored; every control (real pydicom test files) is stored and reads
back equal; the node keeps serving on the same association."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest

from node.dicom.part10 import split_part10
from node.dimse.store import STATUS_FOR_REASON
from node.ingest.results import RejectReason
from tests.support.dimse import ledger_events, scu_store
from tests.support.malformed import build

pytestmark = pytest.mark.dcmtk


def _read_all(ds: pydicom.Dataset) -> list[Any]:
    """Every value, sequences included, converted by pydicom (raises if it cannot)."""
    return [(e.tag, e.VR, e.value) for e in ds.iterall() if e.VR != "SQ"]


def test_malformed_corpus_refused_controls_stored(start_node: Any, tmp_path: Path) -> None:
    node = start_node(ingest={"max_inflated_bytes": 1024 * 1024})
    cases = build(tmp_path / "corpus", bomb_bytes=4 * 1024 * 1024)
    assert {c.category for c in cases} >= {
        "control", "truncation", "bad_length", "unknown_vr", "wrong_vr", "byte_flip",
        "invalid_uid", "path_like_uid", "dimse_mismatch", "transfer_syntax_lie", "nesting",
        "pixel_data", "deflate_bomb", "non_dicom", "duplicate", "patient_conflict",
        "hostile_text"}
    statuses = scu_store(node.address, [c.path for c in cases])
    problems = []
    for c, st in zip(cases, statuses, strict=True):
        ok = {0} if c.must_store else {int(STATUS_FOR_REASON[RejectReason(r)])
                                       for r in c.reasons}
        if st not in ok:
            problems.append(f"{c.name}: status {st!r}, expected one of {sorted(ok)}")
    assert not problems, "\n".join(problems)

    rejected = ledger_events(node, "instance.rejected")
    by_sop: dict[str, set[str]] = {}
    for e in rejected:
        by_sop.setdefault(e.subject.get("sop_uid", ""), set()).add(e.payload["reason"])
    refused = [c for c in cases if not c.must_store]
    assert len(rejected) == len(refused)
    for c in refused:
        assert by_sop.get(c.sop_instance_uid, set()) & set(c.reasons), c.name

    stored = {c.sop_instance_uid: c for c in cases if c.must_store}
    refused_only = {c.sop_instance_uid for c in refused} - set(stored)
    assert node.ctx.index.count_instances() == len(stored)
    for uid in refused_only:
        assert node.ctx.index.get_instance(uid) is None
    for uid, c in stored.items():
        row = node.ctx.index.get_instance(uid)
        assert row is not None, c.name
        _, sent = split_part10(c.path.read_bytes())
        _, body = split_part10(node.ctx.store.read(row.file_path))
        assert body == sent, c.name
        back = pydicom.dcmread(node.ctx.store.path(row.file_path))
        assert _read_all(back) == _read_all(pydicom.dcmread(c.path)), c.name
    assert len(list(node.ctx.store.iter_files())) == len(stored)
    assert not list(node.ctx.store.temp_dir.iterdir())
    # the node still serves: every control again on a new association (identical re-sends)
    controls = [c.path for c in cases if c.category == "control"]
    assert scu_store(node.address, controls) == [0] * len(controls)


def test_patient_conflict_is_refused_and_listed(start_node: Any, tmp_path: Path) -> None:
    """An instance of another Patient ID reusing a stored Study Instance UID is refused
    (not filed under the first patient) and shows in the refusal list."""
    from typer.testing import CliRunner

    from node.cli import app

    node = start_node()
    cases = {c.name: c for c in build(tmp_path / "corpus")}
    first, other = cases["control_CT_small"], cases["patient_conflict"]
    assert scu_store(node.address, [first.path, other.path]) == [
        0, int(STATUS_FOR_REASON[RejectReason.PATIENT_CONFLICT])]
    (study,) = node.ctx.index.studies()
    assert study.patient_id == "I20-control_CT_small" and study.n_instances == 1
    assert node.ctx.index.get_instance(other.sop_instance_uid) is None
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'environment = "development"\ndata_dir = "{node.ctx.settings.data_dir}"\n')
    res = CliRunner().invoke(app, ["ingest", "refused", "--config", str(cfg), "--wide",
                                   "--reason", "patient_conflict"])
    assert res.exit_code == 0, res.output
    assert other.sop_instance_uid in res.output and "patient_conflict" in res.output
