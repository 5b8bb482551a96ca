"""/healthz, /readyz and /metrics on a running node: DCMTK storescu and STOW-RS send real
instances; the Prometheus exposition (parsed with prometheus_client's own parser) counts
exactly what was sent, refused and stored."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.data import get_testdata_file

from tests.support.dicomweb import TOKENS, auth, multipart
from tests.support.dimse import SPECS, dcmtk, make_dataset, part10


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _storescu(web: Any, files: list[str]) -> None:
    host, port = web.node.address
    subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "SYNTHNODE", host,
                    str(port), *files], check=True, capture_output=True, timeout=60)


def test_metrics_count_what_was_sent(web_factory: Any, db_url: str) -> None:
    """On SQLite and PostgreSQL (the scrape-time gauges query either)."""
    web = web_factory(database_url=db_url if db_url.startswith("postgresql") else None)
    files = [get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")]
    _storescu(web, [str(f) for f in files])
    good = part10(make_dataset(SPECS[0]))
    bad_ds = make_dataset(SPECS[1])
    del bad_ds.SeriesInstanceUID  # a Type 1 key missing: refused
    r = httpx.post(web.url + "/studies", content=multipart([good, part10(bad_ds)]),
                   headers={**auth("rw"), "Accept": "application/dicom+json",
                            "Content-Type": 'multipart/related; type="application/dicom"; '
                                            'boundary=b0undary'}, timeout=60)
    assert r.status_code == 202

    assert httpx.get(web.url + "/metrics").status_code == 401
    assert httpx.get(web.url + "/metrics", headers=auth("reader")).status_code == 403
    m = httpx.get(web.url + "/metrics", headers=auth("admin"))
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    s = _samples(m.text)
    assert _get(s, "synthnode_instances_received_total", source="dimse", result="stored") == 2
    assert _get(s, "synthnode_instances_received_total", source="stow", result="stored") == 1
    assert _get(s, "synthnode_instances_refused_total", source="stow",
                reason="missing_attribute") == 1
    assert _get(s, "synthnode_ingest_seconds_count", source="dimse") == 2  # C-STORE latency
    assert _get(s, "synthnode_ingest_seconds_count", source="stow") == 2  # STOW latency
    idx = web.node.ctx.index
    sizes = [i.file_size for i in idx.instances()]
    assert len(sizes) == 3
    assert _get(s, "synthnode_index_instances") == 3
    assert _get(s, "synthnode_index_bytes") == sum(sizes)
    assert _get(s, "synthnode_stored_bytes_total", source="dimse") + \
        _get(s, "synthnode_stored_bytes_total", source="stow") == sum(sizes)
    assert _get(s, "synthnode_ledger_entries") == web.node.ctx.ledger.size()
    assert _get(s, "synthnode_ledger_entries") >= 6  # config, start, 3 received, 1 rejected
    assert _get(s, "synthnode_store_free_bytes") > 0
    # HTTP requests by route template (never the UIDs), method and status
    assert _get(s, "synthnode_http_requests_total", route="/studies", method="POST",
                status="202") == 1
    assert _get(s, "synthnode_http_requests_total", route="/metrics", method="GET",
                status="401") == 1
    assert _get(s, "synthnode_http_requests_total", route="/metrics", method="GET",
                status="403") == 1
    assert not any("1.2.826" in k[0] or any("1.2." in v for _, v in k[1]) for k in s)


def test_health_and_readiness(web: Any) -> None:
    h = httpx.get(web.url + "/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    r = httpx.get(web.url + "/readyz")
    body = r.json()
    assert r.status_code == 200, body
    names = {c["name"]: c for c in body["checks"]}
    assert {"database", "store", "ledger", "dimse"} <= names.keys()
    assert all(c["ok"] for c in names.values())
    host, port = web.node.address
    assert names["dimse"]["detail"] == f"{host}:{port}"
    assert body["measured"]
    web.node.dimse.stop(1.0)  # the DIMSE listener goes away: not ready, naming why
    r = httpx.get(web.url + "/readyz")
    assert r.status_code == 503
    bad = [c for c in r.json()["checks"] if not c["ok"]]
    assert [c["name"] for c in bad] == ["dimse"]


def test_engine_seconds_per_slice() -> None:
    import numpy as np

    from node.observability.metrics import NodeMetrics

    m = NodeMetrics()
    seen = []

    def runner(task: str, volume: Any, params: dict[str, Any], seed: int, model: Any) -> str:
        seen.append((task, volume.shape, params, seed, model))
        return "result"

    timed = m.timed_runner(runner)
    assert timed("ct2mr", np.zeros((40, 8, 8)), {"a": 1}, 7, None) == "result"
    assert seen == [("ct2mr", (40, 8, 8), {"a": 1}, 7, None)]  # passed through unchanged
    s = _samples(m.exposition().decode())
    assert _get(s, "synthnode_engine_seconds_per_slice_count", task="ct2mr") == 1
    assert _get(s, "synthnode_engine_seconds_per_slice_sum", task="ct2mr") > 0


@pytest.mark.dcmtk
@pytest.mark.slow
def test_metrics_summed_over_acceptor_processes(node_process: Any, tmp_path: Path) -> None:
    """dimse.acceptor_processes = 2: the children receive every C-STORE, the parent serves
    HTTP; /metrics (and the console's dashboard) count what all processes received, from
    the run's multiprocess folder under the data folder (removed when the node stops)."""
    import pydicom
    from pydicom.uid import generate_uid

    from tests.support.dicomweb import web_overrides
    from tests.support.net import get_port, wait_for

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    groups = []
    for g in range(8):
        files = []
        for i in range(3):
            src.SOPInstanceUID = generate_uid()
            src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
            f = tmp_path / f"g{g}_{i}.dcm"
            src.save_as(f, enforce_file_format=True)
            files.append(str(f))
        groups.append(files)
    http = get_port()
    node = node_process(dimse={"acceptor_processes": 2}, dicomweb=web_overrides(port=http))
    assert "(2 acceptor processes)" in node.output()
    url = f"http://127.0.0.1:{http}"
    wait_for(lambda: _ok(url + "/healthz"), 30, "the HTTP server of the parent")
    procs = [subprocess.Popen([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "SYNTHNODE",
                               "127.0.0.1", str(node.port), *files]) for files in groups]
    assert [p.wait(120) for p in procs] == [0] * len(groups)
    sent = sum(len(g) for g in groups)
    s = _samples(httpx.get(url + "/metrics", headers=auth("admin"), timeout=30).text)
    assert _get(s, "synthnode_instances_received_total", source="dimse",
                result="stored") == sent
    assert _get(s, "synthnode_ingest_seconds_count", source="dimse") == sent
    assert _get(s, "synthnode_index_instances") == sent  # the database gauge agrees
    (folder,) = (node.data_dir / "run").glob("metrics-*")
    writers = {p.name for p in folder.glob("counter_*.db")}
    # the parent (HTTP) and every acceptor child that served an association wrote (the
    # kernel spreads associations over the children: usually both, not always)
    served = set(re.findall(r"node\.dimse\.associations \[(\d+)\] association STORESCU",
                            node.output()))
    assert served and {f"counter_{pid}.db" for pid in served} <= writers, (served, writers)
    assert len(writers) == len(served) + 1, (served, writers)
    # the console's dashboard reads the same sums
    c = httpx.Client(base_url=url, timeout=30)
    c.post("/console/login", data={"token": TOKENS["reader"][0], "next": "/console/"})
    html = c.get("/console/").text
    row = html.split('data-key="C-STORE instances received since start"', 1)[1]
    assert row.split('class="value', 1)[1].split(">", 1)[1].split("<", 1)[0].strip() == str(sent)
    assert node.terminate(timeout=60) == 0
    assert not folder.exists()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
