"""Access control (bearer tokens with scopes, problem+json), CORS, HTTPS, the
``tokens create`` command, and the auditor's view of DICOMweb reads (``audit patient``)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
from pydicom import dcmread
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from config.settings import load_settings
from node.cli import app
from tests.support.dicomweb import auth, client, multipart
from tests.support.dimse import SPECS, make_dataset, part10

runner = CliRunner()


def test_tokens_and_scopes(web: Any) -> None:
    body = multipart([part10(make_dataset(SPECS[0]))])
    ctype = 'multipart/related; type="application/dicom"; boundary=b0undary'
    r = httpx.get(web.url + "/studies")
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["status"] == 401
    r = httpx.get(web.url + "/studies", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["detail"] == "unknown token"
    assert httpx.get(web.url + "/studies", headers={"Authorization": "Basic eDp5"}
                     ).status_code == 401
    # store-only token cannot read; read-only token cannot store
    r = httpx.get(web.url + "/studies", headers=auth("storer"))
    assert r.status_code == 403 and "read" in r.json()["detail"]
    r = httpx.post(web.url + "/studies", content=body,
                   headers={**auth("reader"), "Content-Type": ctype})
    assert r.status_code == 403
    assert web.node.ctx.index.count_instances() == 0
    r = httpx.post(web.url + "/studies", content=body,
                   headers={**auth("storer"), "Content-Type": ctype})
    assert r.status_code == 200
    assert httpx.get(web.url + "/studies", headers=auth("admin")).status_code == 200


def test_anonymous_scopes_and_cors(web_factory: Any) -> None:
    web = web_factory(anonymous_scopes=["read"], cors_origins=["https://viewer.example"])
    r = httpx.get(web.url + "/studies", headers={"Origin": "https://viewer.example"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://viewer.example"
    pre = httpx.options(web.url + "/studies", headers={
        "Origin": "https://viewer.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200
    other = httpx.get(web.url + "/studies", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    assert httpx.post(web.url + "/studies").status_code == 401  # store still needs a token


def test_https(web_factory: Any, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    web = web_factory(tls_cert_file=str(cert), tls_key_file=str(key))
    assert web.url.startswith("https://")
    r = httpx.get(web.url + "/studies", headers=auth("reader"), verify=False)
    assert r.status_code == 200 and r.json() == []
    with pytest.raises(httpx.HTTPError):
        httpx.get(web.url.replace("https", "http") + "/studies", timeout=5)


def test_tokens_create_command(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_bytes(tomli_w.dumps({"environment": "development",
                                   "data_dir": str(tmp_path / "data")}).encode())
    r = runner.invoke(app, ["tokens", "create", "ohif", "--scopes", "read,store", "-c",
                            str(cfg)])
    assert r.exit_code == 0, r.output
    token = r.output.split("token: ")[1].split()[0]
    assert token not in cfg.read_text()  # only its hash is kept
    (t,) = load_settings(cfg).dicomweb.tokens
    assert (t.name, t.scopes, t.token) == ("ohif", ["read", "store"], None)
    import hashlib

    assert t.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
    assert runner.invoke(app, ["tokens", "create", "x", "--scopes", "root"]).exit_code == 2


def test_auditor_finds_dicomweb_reads_of_a_patient(web: Any, tmp_path: Path) -> None:
    ct, mr = (dcmread(get_testdata_file(n)) for n in ("CT_small.dcm", "MR_small.dcm"))
    client(web.url).store_instances([ct, mr])
    reader = client(web.url, "reader")
    reader.search_for_studies(search_filters={"PatientID": "1CT1"})
    reader.retrieve_study(ct.StudyInstanceUID)
    reader.retrieve_series_metadata(mr.StudyInstanceUID, mr.SeriesInstanceUID)
    web.flush()
    cfg = tmp_path / "same.toml"
    cfg.write_bytes(tomli_w.dumps({"environment": "development",
                                   "data_dir": str(web.node.ctx.settings.data_dir)}).encode())
    r = runner.invoke(app, ["audit", "patient", "1CT1", "--json", "--no-record", "-c",
                            str(cfg)])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    accesses = rep["accesses"] + [x for s in rep["studies"]
                                  for src in s["lineage"]["sources"]
                                  for x in src["retrievals"]]
    kinds = {(a.get("service"), a.get("actor")) for a in accesses}
    assert ("QIDO-RS", "token:reader") in kinds
    assert ("WADO-RS", "token:reader") in kinds
    # the MR patient's metadata read is not in the CT patient's report
    assert all("metadata" not in str(a.get("path", "")) for a in accesses)
    text = runner.invoke(app, ["audit", "patient", "1CT1", "--no-record", "-c", str(cfg)])
    assert "WADO-RS by token:reader" in text.output, text.output
    assert "QIDO-RS by token:reader" in text.output, text.output
    # ATNA (PS3.15 A.5): QIDO-RS reads are "Query", WADO-RS reads "DICOM Instances Accessed"
    from audit.atna import dicom_audit_xml

    xml = {e.event.payload.get("service"): dicom_audit_xml(e)
           for e in web.node.ctx.ledger.entries()
           if e.event.type.value in ("query", "dicomweb.access")}
    assert 'csd-code="110112"' in xml["QIDO-RS"]
    assert 'csd-code="110103"' in xml["WADO-RS"]
    # the ledger holds no Patient ID (QIDO query values stay out)
    blob = b"".join(e.data for e in web.node.ctx.ledger.entries())
    assert b"1CT1" not in blob and b"CompressedSamples" not in blob
