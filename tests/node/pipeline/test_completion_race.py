"""Several associations delivering the first instances of one new study at once: every
instance is counted in ``pipeline_studies`` (no UNIQUE-constraint failure of the stored
instance hook for the losers of the insert race), on SQLite and PostgreSQL."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from config.sections.pipeline import PipelineSettings
from node.db import make_engine, upgrade
from node.pipeline.completion import StudyTracker
from tests.support.dimse import scu_store


def test_first_instances_race(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    t = StudyTracker(engine, PipelineSettings(quiet_period_s=600))
    n = 8
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def one() -> None:
        barrier.wait()
        try:
            t.instance_received("1.2.826.0.1.3680043.10.1137.20.7")
        except BaseException as exc:  # the race lost: IntegrityError
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t.shutdown()
    assert not errors, errors[0]
    st = t.status("1.2.826.0.1.3680043.10.1137.20.7")
    assert st is not None and st.instances == n and st.state == "open"
    engine.dispose()


def test_four_associations_one_new_study(start_node: Any, tmp_path: Path) -> None:
    node = start_node(pipeline={"enabled": True, "quiet_period_s": 600})
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    study = generate_uid()
    files = []
    for i in range(16):
        src.SOPInstanceUID = generate_uid()
        src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        src.StudyInstanceUID = study
        src.InstanceNumber = i + 1
        f = tmp_path / f"r{i}.dcm"
        src.save_as(f, enforce_file_format=True)
        files.append(f)
    results: list[list[int | None]] = []
    threads = [threading.Thread(target=lambda c=files[i::4]: results.append(
        scu_store(node.address, c))) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(s for r in results for s in r) == [0] * 16
    st = node.pipeline.tracker.status(study)
    assert st is not None and st.instances == 16
