"""``log_format = "json"``: a node process started by ``synthnode serve`` writes one JSON
object per line; lines written while serving a DIMSE association name it (AE titles,
peer), stored-instance lines name the study."""
from __future__ import annotations

import json
import logging
import subprocess
from typing import Any

from pydicom import dcmread
from pydicom.data import get_testdata_file

from node.observability.logs import JsonFormatter, log_context
from tests.support.dimse import dcmtk


def test_serve_writes_json_lines_with_association_and_study(node_process: Any) -> None:
    p = node_process(log_format="json")
    f = get_testdata_file("CT_small.dcm")
    study = str(dcmread(f, stop_before_pixels=True).StudyInstanceUID)
    subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "SYNTHNODE", "127.0.0.1",
                    str(p.port), str(f)], check=True, capture_output=True, timeout=60)
    p.terminate()
    lines = [ln for ln in p.output().splitlines() if ln.startswith("{")]
    records = [json.loads(ln) for ln in lines]  # every JSON-looking line parses
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    stored = [r for r in records if r["message"].startswith("C-STORE")]
    assert len(stored) == 1
    assert stored[0]["study"] == study
    assert stored[0]["association"]["calling_ae"] == "STORESCU"
    assert stored[0]["association"]["called_ae"] == "SYNTHNODE"
    assert stored[0]["association"]["peer"].startswith("127.0.0.1:")
    assoc_lines = [r for r in records if "association" in r]
    assert len({r["association"]["id"] for r in assoc_lines}) == 1
    # the text lines a plain `serve` writes are gone: only the start line is not JSON
    others = [ln for ln in p.output().splitlines() if ln.strip() and not ln.startswith("{")]
    assert all(ln.startswith("synthnode:") for ln in others), others


def test_job_and_study_from_log_context() -> None:
    rec = logging.LogRecord("node.pipeline", logging.WARNING, __file__, 1, "attempt %d", (2,),
                            None)
    with log_context(job="j-1", study="1.2.3"):
        inside = json.loads(JsonFormatter().format(rec))
    outside = json.loads(JsonFormatter().format(rec))
    assert inside["job"] == "j-1" and inside["study"] == "1.2.3"
    assert inside["message"] == "attempt 2" and inside["level"] == "WARNING"
    assert "job" not in outside and "study" not in outside and "association" not in outside
