"""Two patients' instances racing into one new Study Instance UID: whichever patient gets
in first owns the study; every instance of the other is refused (patient_conflict), on
SQLite and PostgreSQL, and the index never files both under the study."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.ingest.ingestor import Ingestor
from node.ingest.results import IngestError
from tests.support.dimse import make_ctx


def _body(study: str, patient: str) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def test_two_patients_race_for_one_study(tmp_path: Path, db_url: str) -> None:
    ctx = make_ctx(tmp_path, db_url)
    ing = Ingestor(ctx)
    study = generate_uid()
    bodies = [_body(study, "PAT-A" if i % 2 else "PAT-B") for i in range(8)]
    barrier = threading.Barrier(len(bodies))
    outcomes: list[Any] = []

    def send(body: bytes) -> None:
        barrier.wait()
        try:
            outcomes.append(ing.ingest_dataset(body, ExplicitVRLittleEndian))
        except IngestError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = [o for o in outcomes if not isinstance(o, IngestError)]
    refused = [o for o in outcomes if isinstance(o, IngestError)]
    assert {e.reason.value for e in refused} <= {"patient_conflict"}
    patients = {o.record.patient_id for o in stored}
    assert len(patients) == 1 and len(stored) == 4 and len(refused) == 4
    rows = ctx.index.instances(study_instance_uid=study)
    assert len(rows) == 4
    ctx.engine.dispose()
