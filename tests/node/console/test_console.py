"""The console on a running node, driven over HTTP like a browser (cookies, forms,
redirects): sign-in, the dashboard's numbers against what DCMTK storescu sent, study search
and page with thumbnails, jobs with an admin cancel recorded in the ledger, audit search,
lineage, verification and export, models; scopes enforced."""
from __future__ import annotations

import json
import subprocess
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.support.dicomweb import TOKENS
from tests.support.dimse import dcmtk, ledger_events

FILES = ["CT_small.dcm", "MR_small.dcm"]


def _send(web: Any) -> list[Any]:
    paths = [str(get_testdata_file(f)) for f in FILES]
    host, port = web.node.address
    subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "SYNTHNODE", host,
                    str(port), *paths], check=True, capture_output=True, timeout=60)
    return [dcmread(p, stop_before_pixels=True) for p in paths]


def _login(web: Any, name: str) -> httpx.Client:
    c = httpx.Client(base_url=web.url, timeout=60)
    r = c.post("/console/login", data={"token": TOKENS[name][0], "next": "/console/"})
    assert r.status_code == 303 and r.headers["location"] == "/console/"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/console" in cookie
    return c


def _cell(html: str, label: str) -> str:
    """The value cell of the dashboard row ``label``."""
    row = html.split(f'data-key="{label}"', 1)[1].split("</tr>", 1)[0]
    return row.split('class="value', 1)[1].split(">", 1)[1].split("</td>", 1)[0].strip()


def test_sign_in_and_dashboard_numbers_match_what_was_sent(web: Any) -> None:
    anon = httpx.get(web.url + "/console/")
    assert anon.status_code == 303 and anon.headers["location"].startswith("/console/login")
    bad = httpx.post(web.url + "/console/login", data={"token": "wrong"})
    assert bad.status_code == 401 and "unknown token" in bad.text
    store_only = httpx.post(web.url + "/console/login", data={"token": TOKENS["storer"][0]})
    assert store_only.status_code == 403
    sent = _send(web)
    c = _login(web, "reader")
    assert "none yet" in c.get("/console/").text
    cp = web.node.ctx.audit.checkpoint(force=True)
    html = c.get("/console/").text
    assert _cell(html, "last checkpoint") == f"{cp.size} entries, verified"
    from sqlalchemy import update

    from audit.tables import ledger_checkpoints

    with web.node.ctx.engine.begin() as conn:  # a tampered stored root is shown, not hidden
        conn.execute(update(ledger_checkpoints).values(root_hash=b"\0" * 32))
    tampered = _cell(c.get("/console/").text, "last checkpoint")
    assert tampered.startswith(f"{cp.size} entries, NOT VERIFIED")
    with web.node.ctx.engine.begin() as conn:
        conn.execute(update(ledger_checkpoints).values(root_hash=cp.root))
    assert _cell(html, "C-STORE instances received since start") == str(len(sent))
    assert _cell(html, "instances stored") == str(len(sent))
    assert _cell(html, "readiness") == "ready"
    host, port = web.node.address
    assert _cell(html, "DIMSE listener") == f"SYNTHNODE@{host}:{port}"
    assert _cell(html, "ledger size") == str(web.node.ctx.ledger.size())
    assert _cell(html, "held outputs") == "0"
    assert _cell(html, "ingest rate") == f"{len(sent)} in the last 5 min"
    assert _cell(html, "peers seen in the last hour") == "ae:STORESCU (1)"
    assert "<time>" in html  # every value with its measurement time
    # a header token works as well as the cookie
    h = httpx.get(web.url + "/console/",
                  headers={"Authorization": f"Bearer {TOKENS['reader'][0]}"})
    assert h.status_code == 200
    assert c.post("/console/logout").status_code == 303


def test_studies_search_study_page_and_thumbnail(web: Any) -> None:
    sent = _send(web)
    c = _login(web, "reader")
    ct = sent[0]
    r = c.get("/console/studies", params={"patient_id": str(ct.PatientID)})
    assert r.status_code == 200
    assert f"/console/studies/{ct.StudyInstanceUID}" in r.text
    assert f"/console/studies/{sent[1].StudyInstanceUID}" not in r.text
    none = c.get("/console/studies", params={"synthetic": "YES"})
    assert "0 studies" in none.text
    page = c.get(f"/console/studies/{ct.StudyInstanceUID}")
    assert page.status_code == 200 and str(ct.SeriesInstanceUID) in page.text
    assert "original" in page.text and "Nothing dispatched" in page.text
    assert "not tracked" in page.text and "Rules matched: none" in page.text  # no pipeline
    thumb = c.get(f"/console/thumbnail/{ct.StudyInstanceUID}/{ct.SeriesInstanceUID}")
    assert thumb.status_code == 200 and thumb.content[:8] == b"\x89PNG\r\n\x1a\n"
    web.flush()  # console reads are in the ledger like any DICOMweb read
    reads = ledger_events(web.node, "dicomweb.access")
    assert any(e.actor == "token:reader" and e.payload.get("kind") == "thumbnail"
               for e in reads)
    assert c.get("/console/studies/1.2.3.4.5").status_code == 404


def test_jobs_cancel_needs_admin_and_is_recorded(web: Any) -> None:
    from node.pipeline.jobs import JobStore

    ctx = web.node.ctx
    store = JobStore(ctx.engine, ctx.ledger)
    job = store.get(store.enqueue("dispatch", study_uid="1.2.3", series_uid="1.2.3.4",
                                  spec={"destination": "ORTHANC"}))
    reader = _login(web, "reader")
    lst = reader.get("/console/jobs", params={"state": "queued"})
    assert job.id[:8] in lst.text
    assert 'id="do-cancel"' not in reader.get(f"/console/jobs/{job.id}").text
    denied = reader.post(f"/console/jobs/{job.id}/cancel", data={"reason": "x"})
    assert denied.status_code == 403
    admin = _login(web, "admin")
    assert admin.post(f"/console/jobs/{job.id}/cancel", data={"reason": ""}).status_code == 400
    cross = admin.post(f"/console/jobs/{job.id}/cancel", data={"reason": "x"},
                       headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403
    r = admin.post(f"/console/jobs/{job.id}/cancel", data={"reason": "wrong destination"})
    assert r.status_code == 303
    page = admin.get(r.headers["location"])
    assert 'id="job-state">cancelled' in page.text
    ev = [e for e in ledger_events(web.node, "job.cancelled") if e.actor == "token:admin"]
    assert len(ev) == 1 and ev[0].payload["reason"] == "wrong destination"
    assert ev[0].subject["job_id"] == job.id
    assert JobStore(ctx.engine, ctx.ledger).get(job.id).state.value == "cancelled"
    r = admin.post(f"/console/jobs/{job.id}/retry", data={"reason": "destination fixed"})
    assert r.status_code == 303
    assert JobStore(ctx.engine, ctx.ledger).get(job.id).state.value == "queued"
    ev = [e for e in ledger_events(web.node, "job.queued") if e.actor == "token:admin"]
    assert [e.payload["reason"] for e in ev] == ["destination fixed"]
    again = admin.post(f"/console/jobs/{job.id}/retry", data={"reason": "twice"})
    assert again.status_code == 409  # a queued job cannot be retried


def test_audit_search_lineage_verify_export_and_scopes(web: Any) -> None:
    sent = _send(web)
    study = str(sent[0].StudyInstanceUID)
    reader = _login(web, "reader")
    assert reader.get("/console/audit").status_code == 403  # audit needs the audit scope
    assert reader.get("/console/models").status_code == 403
    admin = _login(web, "admin")
    r = admin.get("/console/audit", params={"uid": study, "event": "instance.received"})
    assert r.status_code == 200 and "1 entry" in r.text and "ae:STORESCU" in r.text
    bad = admin.get("/console/audit", params={"since": "yesterday"})
    assert bad.status_code == 200 and 'role="alert"' in bad.text
    lin = admin.get("/console/audit/lineage", params={"uid": study})
    assert lin.status_code == 200 and 'id="lineage"' in lin.text
    assert str(sent[0].SeriesInstanceUID) in lin.text
    v = _verified(admin)
    assert 'id="verify-result" class="ok"' in v and "Verified" in v
    runs = ledger_events(web.node, "verification.run")
    assert runs[-1].actor == "token:admin" and runs[-1].payload["ok"] is True
    exp = admin.get("/console/audit/export", params={"uid": study})
    lines = [json.loads(x) for x in exp.text.splitlines()]
    assert exp.headers["content-disposition"].startswith("attachment")
    assert [x["type"] for x in lines] == ["instance.received"]
    fhir = admin.get("/console/audit/export", params={"uid": study, "format": "fhir"}).json()
    assert fhir["resourceType"] == "Bundle"
    assert "AuditEvent" in {e["resource"]["resourceType"] for e in fhir["entry"]}
    dic = admin.get("/console/audit/export", params={"uid": study, "format": "dicom"}).text
    assert dic.count("<AuditMessage") == 1
    whole = admin.get("/console/audit/export", params={"format": "ledger"}).text.splitlines()
    head = json.loads(whole[0])  # the verifiable export of `synthnode audit export`
    assert head["format"] == "synthnode-ledger-export"
    assert [json.loads(x)["seq"] for x in whole[1:] if "seq" in x] == list(range(head["size"]))
    assert admin.get("/console/audit/export", params={"format": "pdf"}).status_code == 400
    seq = int(lines[0]["seq"])
    assert f'/console/audit/proof/{seq}"' in r.text
    pr = admin.get(f"/console/audit/proof/{seq}")
    assert pr.status_code == 200 and pr.headers["content-disposition"].startswith("attachment")
    from audit import merkle

    p = pr.json()["entries"][str(seq)]
    merkle.verify_inclusion(seq, p["tree_size"], bytes.fromhex(p["leaf_hash"]),
                            [bytes.fromhex(h) for h in p["proof"]],
                            bytes.fromhex(p["root_hash"]))  # raises if the proof is wrong
    assert merkle.leaf_hash(p["leaf_data"].encode()) == bytes.fromhex(p["leaf_hash"])
    assert admin.get("/console/audit/proof/999999").status_code == 404
    m = admin.get("/console/models")
    assert m.status_code == 200 and "Models" in m.text


@pytest.mark.parametrize("path", ["/console/", "/console/studies", "/console/jobs"])
def test_pages_have_labels_and_skip_link(web: Any, path: str) -> None:
    c = _login(web, "admin")
    html = c.get(path).text
    assert 'href="#main"' in html and '<main id="main"' in html
    # every input / select has a label naming it
    import re

    ids = re.findall(r'<(?:input|select)[^>]* id="([^"]+)"', html)
    for i in ids:
        assert f'for="{i}"' in html, i


def test_held_output_shown_on_dashboard_and_job_page(web: Any) -> None:
    """A job whose output the quality gate held (as the pipeline records it: the job's
    result lists it with the failed checks, and an output.held ledger entry)."""
    from audit.events import Event, EventType, Outcome
    from node.pipeline.jobs import JobStore

    ctx = web.node.ctx
    store = JobStore(ctx.engine, ctx.ledger)
    jid = store.enqueue("engine", study_uid="1.2.3", series_uid="1.2.3.4", task="ct2mr",
                        spec={"fingerprint": "f00"})
    job = store.claim(job_id=jid)
    assert job is not None
    checks = [{"name": "max_abs_bias_hu", "value": "88.0", "limit": "30.0", "passed": False}]
    store.finish(jid, {"outputs": [], "held": [{"index": 0, "reasons": ["bias 88 HU > 30"],
                                                "checks": checks}]}, claim=job)
    ctx.ledger.append(Event(EventType.OUTPUT_HELD, "component:pipeline", Outcome.MINOR_FAILURE,
                            subject={"job_id": jid, "study_uid": "1.2.3"},
                            payload={"source_series_uids": ["1.2.3.4"],
                                     "reasons": ["bias 88 HU > 30"], "checks": checks,
                                     "output_index": 0}))
    c = _login(web, "reader")
    assert _cell(c.get("/console/").text, "held outputs") == "1"
    page = c.get(f"/console/jobs/{jid}").text
    held = page.split('id="held"', 1)[1].split("</table>", 1)[0]
    assert "bias 88 HU &gt; 30" in held and "max_abs_bias_hu" in held


def test_study_completion_state_with_the_pipeline(start_node: Any) -> None:
    from tests.node.dicomweb.conftest import Web
    from tests.support.dicomweb import web_overrides

    web = Web(start_node(dicomweb=web_overrides(),
                         pipeline={"enabled": True, "quiet_period_s": 3600}))
    sent = _send(web)
    c = _login(web, "reader")
    page = c.get(f"/console/studies/{sent[0].StudyInstanceUID}").text
    line = page.split('id="completion"', 1)[1].split("</p>", 1)[0]
    assert "Completion: open (1 instance(s) seen by the pipeline" in line
    html = c.get("/console/").text
    assert "workers: ok" in _cell_detail(html, "readiness")


def _cell_detail(html: str, label: str) -> str:
    row = html.split(f'data-key="{label}"', 1)[1].split("</tr>", 1)[0]
    return row.split("</td>", 1)[1]


def _graph(html: str) -> tuple[dict[str, dict[str, str]], set[tuple[str, str]]]:
    """The lineage SVG's nodes (data-id -> attributes) and edges (data-from, data-to)."""
    import re

    svg = html.split('<svg id="lineage-graph"', 1)[1].split("</svg>", 1)[0]
    nodes = {}
    for tag in re.findall(r'<(?:a|g) [^>]*data-id="[^"]*"[^>]*>', svg):
        attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', tag))
        nodes[attrs["data-id"]] = attrs
    edges = set(re.findall(r'data-from="([^"]+)" data-to="([^"]+)"', svg))
    return nodes, edges


def test_lineage_graph_of_a_held_output(web: Any) -> None:
    """Sent by storescu, an engine job on its CT series whose output the quality gate held
    (as the pipeline records it): the graph draws source -> job -> model -> held output,
    the held state in words, each node a link; the text tree stays beside it."""
    from audit.events import Event, EventType, Outcome
    from node.pipeline.jobs import JobStore

    sent = _send(web)
    ct = sent[0]
    series, study = str(ct.SeriesInstanceUID), str(ct.StudyInstanceUID)
    ctx = web.node.ctx
    store = JobStore(ctx.engine, ctx.ledger)
    jid = store.enqueue("engine", study_uid=study, series_uid=series, task="ct2mr",
                        spec={"fingerprint": "f00"})
    job = store.claim(job_id=jid)
    assert job is not None
    store.finish(jid, {"outputs": [], "held": [{"index": 0, "reasons": ["bias 88 HU > 30"],
                                                "checks": []}]}, claim=job)
    held = ctx.ledger.append(Event(
        EventType.OUTPUT_HELD, "component:pipeline", Outcome.MINOR_FAILURE,
        subject={"job_id": jid, "study_uid": study, "model_id": "tiny-ct2mr"},
        payload={"source_series_uids": [series], "reasons": ["bias 88 HU > 30"],
                 "checks": ["max_abs_bias_hu"], "output_index": 0}))
    c = _login(web, "admin")
    html = c.get("/console/audit/lineage", params={"uid": study}).text
    nodes, edges = _graph(html)
    assert {(f"s:{series}", f"j:{jid}"), (f"j:{jid}", f"m:{jid}"),
            (f"m:{jid}", f"h:{held.seq}")} <= edges
    mr = f"s:{sent[1].SeriesInstanceUID}"
    assert mr not in nodes  # another study
    assert nodes[f"h:{held.seq}"]["data-state"] == "HELD"
    assert nodes[f"h:{held.seq}"]["href"] == f"/console/jobs/{jid}"
    assert nodes[f"j:{jid}"]["data-state"] == "SUCCEEDED"
    assert nodes[f"s:{series}"]["href"] == f"/console/studies/{study}"
    assert nodes[f"m:{jid}"]["href"] == "/console/models"
    assert 'id="lineage"' in html and "held by the quality gate" in html  # the text view
    one = c.get("/console/audit", params={"seq": held.seq}).text
    assert f'id="e-{held.seq}"' in one and "1 entry" in one
    assert 'role="alert"' in c.get("/console/audit", params={"seq": 10**6}).text


def _verified(c: httpx.Client) -> str:
    """Start a verification from the Audit page's form, poll its progress endpoint as the
    page does, and return the finished run's page."""
    from tests.support.net import wait_for

    r = c.post("/console/audit/verify")
    assert r.status_code == 303 and r.headers["location"].startswith("/console/audit/verify/")
    page = c.get(r.headers["location"])
    assert page.status_code == 200 and 'id="verify-progress"' in page.text
    wait_for(lambda: not c.get(r.headers["location"] + "/progress").json()["running"], 60,
             "the verification to finish")
    return c.get(r.headers["location"]).text


def test_verification_runs_in_the_background_with_progress(web: Any) -> None:
    """One run at a time (a second start joins the first), its progress readable while it
    runs (entries checked of the ledger's size), the verified checkpoint at the end; a
    tampered entry ends in a failed verification on the page, naming the entry."""
    import threading

    from sqlalchemy import select, update

    from audit.tables import ledger_entries
    from audit.verify import verify_database
    from tests.support.net import wait_for

    _send(web)
    ctx = web.node.ctx
    cp = ctx.audit.checkpoint(force=True)
    # the node's verification, held at its first progress step (a real verification,
    # waiting): the page shows the progress, and a second start joins the run
    gate, seen = threading.Event(), []

    def held(*args: Any, progress: Any, **kw: Any) -> Any:
        def slow(phase: str, done: int, total: int) -> None:
            progress(phase, done, total)
            seen.append((phase, done, total))
            gate.wait(30)
        return verify_database(*args, **{**kw, "progress": slow})

    runs = web.node.dicomweb.app.state.verifications
    runs.verify = held
    admin = _login(web, "admin")
    try:
        r = admin.post("/console/audit/verify")
        assert r.status_code == 303
        run_url = r.headers["location"]
        wait_for(lambda: seen, 30, "the first progress step")
        again = admin.post("/console/audit/verify")
        assert again.headers["location"] == run_url  # one run at a time
        state = admin.get(run_url + "/progress").json()
        assert state["running"] and state["phase"] == "entries"
        assert state["total"] >= cp.size and state["checked"] == 0
        page = admin.get(run_url).text
        assert '<progress id="verify-bar"' in page and 'id="verify-result"' not in page
        assert '<noscript><meta http-equiv="refresh"' in page  # without script too
        assert f"of {state['total']} entries checked" in page
    finally:
        gate.set()
        runs.wait(30)
        runs.verify = verify_database
    done = admin.get(run_url + "/progress").json()
    assert done["report"]["ok"] and not done["running"] and done["percent"] == 100
    assert done["checkpoint"] == {"size": cp.size, "root": cp.root.hex(), "verified": True}
    assert seen[-1][0] == "tree nodes, head and checkpoints" and seen[-1][1] == seen[-1][2]
    assert "noscript" not in admin.get(run_url).text  # finished: no more refreshing

    reader = _login(web, "reader")
    assert reader.post("/console/audit/verify").status_code == 403
    assert reader.get(run_url + "/progress").status_code == 403
    ok = _verified(admin)
    assert "Verified" in ok and f"Latest signed checkpoint checked: {cp.size} entries" in ok
    # tamper with one entry's data: the run fails and names it
    seq = 1
    with ctx.engine.begin() as conn:
        saved = conn.execute(select(ledger_entries.c.data)
                             .where(ledger_entries.c.seq == seq)).scalar_one()
        conn.execute(update(ledger_entries).where(ledger_entries.c.seq == seq)
                     .values(data=bytes(saved).replace(b"STORESCU", b"STORESCX")
                             if b"STORESCU" in bytes(saved) else bytes(saved) + b" "))
    try:
        bad = _verified(admin)
    finally:
        with ctx.engine.begin() as conn:
            conn.execute(update(ledger_entries).where(ledger_entries.c.seq == seq)
                         .values(data=saved))
    assert 'id="verify-result" class="bad"' in bad and "FAILED" in bad
    assert f"first bad entry {seq}" in bad and 'id="verify-problems"' in bad
    runs_ev = ledger_events(web.node, "verification.run")
    assert runs_ev[-1].payload["ok"] is False and runs_ev[-1].payload["first_bad_entry"] == seq
    assert runs_ev[-1].actor == "token:admin" and runs_ev[-1].payload["via"] == "console"


def test_held_pictures_expire_with_the_retention_period(start_node: Any) -> None:
    """The kept slices of a held output no one decided on are removed once older than
    ``storage.retention_days``, recorded in the ledger; a younger one stays; the held output
    still waits for a decision, its page without a picture."""
    import os
    import time

    import numpy as np

    from engine.types import Intensity, Volume
    from node.pipeline.jobs import JobStore
    from node.pipeline.preview import held_slices_path, save_held_slices
    from tests.node.dicomweb.conftest import Web
    from tests.support.dicomweb import web_overrides

    web = Web(start_node(dicomweb=web_overrides(), storage={"retention_days": 2},
                         pipeline={"enabled": True, "quiet_period_s": 3600}))
    ctx, pipeline = web.node.ctx, web.node.pipeline
    assert pipeline.held_retention_days == 2
    store = JobStore(ctx.engine, ctx.ledger)
    held_dir = ctx.settings.data_dir / "held"
    vol = Volume(np.linspace(-1000, 1000, 4 * 16 * 16, dtype=np.float32).reshape(4, 16, 16),
                 (1.0, 1.0, 1.0), Intensity.HU)
    jobs = []
    for study in ("1.2.3.1", "1.2.3.2"):
        jid = store.enqueue("engine", study_uid=study, series_uid=study + ".1", task="ct2mr",
                            spec={"fingerprint": "f00"})
        job = store.claim(job_id=jid)
        assert job is not None
        store.finish(jid, {"outputs": [], "held": [{"index": 0, "reasons": ["bias"],
                                                    "checks": []}]}, claim=job)
        save_held_slices(held_dir, jid, 0, vol, vol)
        jobs.append(jid)
    old, young = jobs
    three_days_ago = time.time() - 3 * 86400
    os.utime(held_slices_path(held_dir, old, 0), (three_days_ago, three_days_ago))
    c = _login(web, "reader")
    assert c.get(f"/console/jobs/{old}/held/0.png").status_code == 200
    assert pipeline.expire_held_pictures() == {old: 1}
    assert not (held_dir / old).exists() and held_slices_path(held_dir, young, 0).is_file()
    (ev,) = ledger_events(web.node, "output.pictures_expired")
    assert ev.subject == {"job_id": old, "study_uid": "1.2.3.1"}
    assert ev.payload["files"] == 1 and ev.payload["retention_days"] == 2
    assert ev.actor == "component:pipeline"
    assert c.get(f"/console/jobs/{old}/held/0.png").status_code == 404
    page = c.get(f"/console/jobs/{old}").text
    assert 'id="picture-expired-0"' in page and f"/console/audit?seq={ev_seq(web, old)}" in page
    assert 'id="held-picture-0"' in c.get(f"/console/jobs/{young}").text
    assert c.get(f"/console/jobs/{young}/held/0.png").status_code == 200
    assert _cell(c.get("/console/").text, "held outputs") == "2"  # still to be decided
    assert pipeline.expire_held_pictures() == {}  # nothing more, nothing recorded twice
    assert len(ledger_events(web.node, "output.pictures_expired")) == 1


def ev_seq(web: Any, job_id: str) -> int:
    """The seq of the ``output.pictures_expired`` entry of ``job_id``."""
    (e,) = web.node.ctx.ledger.query(uids=[job_id], event_types=["output.pictures_expired"])
    return int(e.seq)


def test_lineage_graph_of_a_failed_forward(start_node: Any) -> None:
    """A rule forwards the original CT series to a PACS that is down (a closed port): the
    graph draws source series -> destination FAILED -> each failed attempt, linked to its
    ledger entry and its dispatch job."""
    from node.pipeline.jobs import JobStore
    from tests.node.dicomweb.conftest import Web
    from tests.support.dicomweb import web_overrides
    from tests.support.net import get_port, wait_for

    web = Web(start_node(dicomweb=web_overrides(), pipeline={
        "enabled": True, "quiet_period_s": 1, "retry_backoff_s": 0.2,
        "destinations": [{"name": "downpacs", "kind": "dimse", "ae_title": "DOWN",
                          "host": "127.0.0.1", "port": get_port(), "max_attempts": 2,
                          "backoff_s": 0.2}],
        "rules": [{"name": "forward-ct", "match": {"modality": "CT"},
                   "destinations": ["downpacs"], "forward_originals": True}]}))
    ct = _send(web)[0]
    series, study = str(ct.SeriesInstanceUID), str(ct.StudyInstanceUID)
    ctx = web.node.ctx
    store = JobStore(ctx.engine, ctx.ledger)

    def failed() -> Any:
        jobs = [j for j in store.list(study_uid=study) if j.kind.value == "dispatch"]
        return jobs if jobs and all(j.state.value == "failed" for j in jobs) else None

    (job,) = wait_for(failed, 60, "the dispatch job to fail")
    c = _login(web, "admin")
    nodes, edges = _graph(c.get("/console/audit/lineage", params={"uid": study}).text)
    dest = f"d:{series}:downpacs"
    assert (f"s:{series}", dest) in edges
    assert nodes[dest]["data-state"] == "FAILED"
    assert nodes[dest]["href"] == f"/console/jobs/{job.id}"
    attempts = [nodes[b] for a, b in edges if a == dest]
    assert attempts and "FAILED" in {a["data-state"] for a in attempts}
    assert all(a["href"].startswith("/console/audit?seq=") for a in attempts)
    assert not [n for n in nodes if n.startswith("j:")]  # no engine job: forwarded as received
