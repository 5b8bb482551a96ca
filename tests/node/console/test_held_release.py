"""A held output decided from the console, end to end with real peers: DCMTK storescu sends a
CT series to a running node, the engine (a tiny model admitted by the model gate)
synthesises MR, and the quality gate (a strict limit in [pipeline.quality]) holds it. The
dashboard counts it, the job page shows the failed checks and the input | output |
difference picture the node renders; an admin releases it with a reason (the pipeline's
own release, the one ``synthnode jobs release`` calls), the ledger records the token's name
and the reason, and the output arrives in a real Orthanc; the Models page lists the jobs
the model was used for. Another held job is discarded."""
from __future__ import annotations

import html
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image

from audit.ledger import Ledger
from audit.modelgate import public_key_b64
from config.settings import load_settings
from node.app import create_node
from node.pipeline.jobs import JobKind, JobState
from tests.node.console.test_browser import _shot, _value
from tests.node.console.test_console import _graph
from tests.support.dicomweb import TOKENS, web_overrides
from tests.support.dimse import dcmtk, ledger_events, node_settings_dict
from tests.support.engine import approved_tiny_model
from tests.support.factory import make_series
from tests.support.net import get_port, wait_for
from tests.support.orthanc import OrthancServer

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk, pytest.mark.slow]


def _login(url: str, name: str) -> httpx.Client:
    c = httpx.Client(base_url=url, timeout=60)
    r = c.post("/console/login", data={"token": TOKENS[name][0], "next": "/console/"})
    assert r.status_code == 303
    return c


def _cell(html: str, label: str) -> str:
    row = html.split(f'data-key="{label}"', 1)[1].split("</tr>", 1)[0]
    return row.split('class="value', 1)[1].split(">", 1)[1].split("</td>", 1)[0].strip()


def _send(tmp_path: Path, port: int, tag: str) -> str:
    series = make_series(4, rows=256, cols=256)
    files = []
    for i, ds in enumerate(series):
        p = tmp_path / f"{tag}{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        files.append(str(p))
    subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "SYNTHNODE", "127.0.0.1",
                    str(port), *files], check=True, timeout=60, capture_output=True)
    return str(series[0].StudyInstanceUID)


def _held_job(node: Any, study: str) -> Any:
    def done():  # type: ignore[no-untyped-def]
        jobs = node.pipeline.jobs.list(study_uid=study, kind="engine")
        bad = [j for j in jobs if j.state is JobState.FAILED]
        assert not bad, [j.error for j in bad]
        ok = [j for j in jobs if j.state is JobState.SUCCEEDED]
        return ok[0] if ok else None

    return wait_for(done, 240, "the engine job")


@contextmanager
def held_node(tmp_path: Path, orthanc: OrthancServer) -> Iterator[tuple[Any, int]]:
    """A running node (DIMSE, DICOMweb + console, pipeline sending to ``orthanc``) whose
    quality gate holds the tiny model's CT -> MR output; yields the node and its DIMSE
    port."""
    approver = Ed25519PrivateKey.generate()
    models = tmp_path / "models"
    port = get_port()
    settings = load_settings(None, **node_settings_dict(
        tmp_path / "node", port, dicomweb=web_overrides(),
        audit={"approvers": [{"name": "tester",
                              "public_key": public_key_b64(approver.public_key())}],
               "models_dir": str(models)},
        engine={"device": "cpu"},
        # the untrained model's smooth output: a bound that carries a readable mark whatever
        # the (random) watermark key, so the released output is verified and dispatched
        watermark={"other_max_delta": 16},
        pipeline={
            "enabled": True, "quiet_period_s": 2,
            # strict: the foreground masks of input and output must overlap exactly
            "quality": {"enabled": True, "min_foreground_dice": 1.0},
            "destinations": [{"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet,
                              "host": "127.0.0.1", "port": orthanc.dicom_port,
                              "accepts_synthetic": True, "backoff_s": 1}],
            "rules": [{"name": "ct-to-mr", "match": {"modality": "CT"},
                       "tasks": [{"task": "ct_to_mr", "params": {"target": "t2w"},
                                  "output_format": "mf_word_sc"}],
                       "destinations": ["pacs"]}],
        }))
    node = create_node(settings)
    approved_tiny_model(models, Ledger(node.ctx.engine), approver)
    node.start()
    try:
        yield node, port
    finally:
        node.stop(grace_s=5)


def test_held_output_released_from_the_console_reaches_orthanc(
        tmp_path: Path, orthanc: OrthancServer) -> None:
    with held_node(tmp_path, orthanc) as (node, port):
        url = str(node.dicomweb.url)
        study = _send(tmp_path, port, "a")
        job = _held_job(node, study)
        assert job.result["outcome"] == "held" and job.result["outputs"] == []
        assert "foreground_dice" in job.result["held"][0]["checks"]
        assert orthanc.instance_uids() == set()  # held: nothing dispatched
        reader = _login(url, "reader")
        assert _cell(reader.get("/console/").text, "held outputs") == "1"
        page = reader.get(f"/console/jobs/{job.id}").text
        assert "foreground Dice" in page and 'id="do-release"' not in page  # read scope
        # the picture: rendered by the node from the held output's and the input's slices
        r = reader.get(f"/console/jobs/{job.id}/held/0.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        img = Image.open(BytesIO(r.content))
        img.load()
        assert img.mode == "L" and img.size == (3 * 256 + 2 * 4, 256)
        panels = [img.crop((x, 0, x + 256, 256)) for x in (0, 260, 520)]
        assert all(p.getextrema()[1] > p.getextrema()[0] for p in panels)  # not blank
        node.dicomweb.recorder.flush()
        (read,) = [e for e in ledger_events(node, "dicomweb.access")
                   if e.payload.get("kind") == "held-picture"]
        assert read.actor == "token:reader" and read.subject["study_uid"] == study
        assert read.payload["job_id"] == job.id and read.payload["series_uids"] == [job.series_uid]
        assert reader.get(f"/console/jobs/{job.id}/held/7.png").status_code == 404
        assert reader.post(f"/console/jobs/{job.id}/release",
                           data={"reason": "x"}).status_code == 403
        admin = _login(url, "admin")
        page = admin.get(f"/console/jobs/{job.id}").text
        assert 'id="do-release"' in page and 'id="do-discard"' in page
        assert admin.post(f"/console/jobs/{job.id}/release",
                          data={"reason": " "}).status_code == 400
        r = admin.post(f"/console/jobs/{job.id}/release",
                       data={"reason": "reviewed the slices: anatomy matches"})
        assert r.status_code == 303, r.text
        # decided: the kept slices (patient pixel data) are gone, and so is the picture
        assert not (node.ctx.settings.data_dir / "held" / job.id).exists()
        assert reader.get(f"/console/jobs/{job.id}/held/0.png").status_code == 404
        page = admin.get(r.headers["location"]).text
        assert 'id="decision"' in page and "token:admin" in page
        assert 'id="do-release"' not in page
        again = admin.post(f"/console/jobs/{job.id}/release", data={"reason": "twice"})
        assert again.status_code == 409 and "already released" in again.text
        (ev,) = ledger_events(node, "output.released")
        assert ev.actor == "token:admin"
        assert ev.payload["reason"] == "reviewed the slices: anatomy matches"
        assert "foreground_dice" in ev.payload["checks"]
        assert ev.payload["via"] == "console" and ev.payload["address"].startswith("127.0.0.1")
        # the release job builds the output and the pipeline dispatches it to Orthanc
        new = node.pipeline.jobs.get(ev.payload["new_job_id"])
        try:
            got = wait_for(lambda: orthanc.instance_uids() or None, 240, "the output in Orthanc")
        except AssertionError as exc:  # say what the release job did
            raise AssertionError(f"{exc}; release job {node.pipeline.jobs.get(new.id)}") from exc
        (uid,) = got
        out = pydicom.dcmread(BytesIO(orthanc.instance_file(uid)))
        assert out.SyntheticData == "YES" and out.StudyInstanceUID == study
        # the lineage page follows the study to the destination and its send attempt
        def lineage_to_pacs() -> str | None:
            text = html.unescape(admin.get("/console/audit/lineage",
                                           params={"uid": study}).text)
            return text if "-> pacs" in text and "dispatch." in text else None

        lineage = wait_for(lineage_to_pacs, 60, "the dispatch in the lineage")
        assert out.SeriesInstanceUID in lineage and job.series_uid in lineage
        # the graph: source -> held job -> model -> held output (released), and the release
        # job -> model -> output -> pacs (delivered) -> its send attempts
        nodes, edges = _graph(admin.get("/console/audit/lineage", params={"uid": study}).text)
        src, j1, j2 = f"s:{job.series_uid}", f"j:{job.id}", f"j:{new.id}"
        (held,) = [n for n in nodes if n.startswith("h:")]
        assert nodes[held]["data-state"] == "HELD, RELEASED"
        assert "by token:admin: reviewed the slices" in nodes[held]["aria-label"]
        out_node, dest = f"o:{out.SeriesInstanceUID}", f"d:{out.SeriesInstanceUID}:pacs"
        assert {(src, j1), (j1, f"m:{job.id}"), (f"m:{job.id}", held), (src, j2),
                (j2, f"m:{new.id}"), (f"m:{new.id}", out_node), (out_node, dest)} <= edges
        assert nodes[dest]["data-state"] == "DELIVERED"
        attempts = {b: nodes[b]["data-state"] for a, b in edges if a == dest}
        assert "SENT" in attempts.values(), attempts
        assert all(nodes[b]["href"].startswith("/console/audit?seq=") for b in attempts)
        new = node.pipeline.jobs.get(ev.payload["new_job_id"])
        assert new.result["quality_released"]["by"] == "token:admin"
        assert _cell(reader.get("/console/").text, "held outputs") == "0"
        # the Models page names where the model was used: the held job and the release job
        models = admin.get("/console/models").text
        uses = models.split('id="uses-', 1)[1].split("</td>", 1)[0]
        assert "Used for 2 output(s)" in uses
        assert job.id[:8] in uses and new.id[:8] in uses and study in uses

        # a second held output, discarded from the page
        study2 = _send(tmp_path, port, "b")
        job2 = _held_job(node, study2)
        assert _cell(reader.get("/console/").text, "held outputs") == "1"
        assert (node.ctx.settings.data_dir / "held" / job2.id / "0.npz").is_file()
        r = admin.post(f"/console/jobs/{job2.id}/discard", data={"reason": "motion artefact"})
        assert r.status_code == 303
        assert not (node.ctx.settings.data_dir / "held" / job2.id).exists()
        (gone,) = ledger_events(node, "output.discarded")
        assert gone.actor == "token:admin" and gone.payload["reason"] == "motion artefact"
        assert gone.payload["via"] == "console"
        assert _cell(reader.get("/console/").text, "held outputs") == "0"
        assert not [j for j in node.pipeline.jobs.list(study_uid=study2)
                    if j.kind is JobKind.DISPATCH]


def test_held_output_released_in_chromium(tmp_path: Path, orthanc: OrthancServer,
                                          browser: Any) -> None:
    """The same from a real browser: the picture decodes, the reason is typed and the form
    sent with the keyboard, the output arrives in Orthanc."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with held_node(tmp_path, orthanc) as (node, port):
        url = str(node.dicomweb.url)
        job = _held_job(node, _send(tmp_path, port, "c"))
        assert job.result["outcome"] == "held"
        d = browser
        d.get(url + "/console/login")
        d.switch_to.active_element.send_keys(TOKENS["admin"][0] + Keys.ENTER)
        # the form posts and redirects: wait for the dashboard, not the first poll
        WebDriverWait(d, 30).until(lambda drv: drv.current_url.endswith("/console/"))
        assert _value(d, "held outputs") == "1"
        d.get(f"{url}/console/jobs/{job.id}")
        img = d.find_element(By.ID, "held-picture-0")
        WebDriverWait(d, 30).until(lambda drv: drv.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", img))
        assert "difference" in img.get_attribute("alt")
        _shot(d, "held")
        d.find_element(By.ID, "reason-release").send_keys("slices reviewed" + Keys.ENTER)
        assert "token:admin" in d.find_element(By.ID, "decision").text
        (ev,) = ledger_events(node, "output.released")
        assert ev.actor == "token:admin" and ev.payload["reason"] == "slices reviewed"
        got = wait_for(lambda: orthanc.instance_uids() or None, 240, "the output in Orthanc")
        assert len(got) == 1
        # the lineage graph, drawn by the node, shown by the browser up to the destination
        def delivered() -> bool:
            d.get(f"{url}/console/audit/lineage?uid={job.study_uid}")
            return bool(d.find_elements(By.CSS_SELECTOR, '#lineage-graph [data-kind='
                                        '"destination"][data-state="DELIVERED"]'))

        wait_for(delivered, 60, "the delivered destination in the lineage graph")
        graph = d.find_element(By.ID, "lineage-graph")
        assert graph.is_displayed() and graph.size["width"] > 600
        dest = d.find_element(By.CSS_SELECTOR, '#lineage-graph [data-kind="destination"]')
        assert dest.is_displayed() and "pacs" in dest.text and "DELIVERED" in dest.text
        assert "RELEASED" in d.find_element(
            By.CSS_SELECTOR, '#lineage-graph [data-kind="output"]').text
        _shot(d, "lineage")
