"""QIDO-RS with dicomweb-client and raw HTTP over the known instances of SPECS."""
from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.support.dicomweb import auth, client
from tests.support.dimse import SPECS, ledger_events


def _get(web: Any, path: str, params: Any = None, **headers: str) -> httpx.Response:
    return httpx.get(web.url + path, params=params, headers={**auth("reader"), **headers},
                     timeout=30)


def _uids(results: list[dict[str, Any]], tag: str) -> list[str]:
    return [r[tag]["Value"][0] for r in results]


STUDIES = sorted({s.study_uid for s in SPECS})


def test_studies_default_attributes(loaded_web: Any) -> None:
    res = client(loaded_web.url, "reader").search_for_studies()
    assert sorted(_uids(res, "0020000D")) == STUDIES
    s1 = next(r for r in res if r["0020000D"]["Value"][0] == SPECS[0].study_uid)
    assert s1["00201206"]["Value"] == [2]  # NumberOfStudyRelatedSeries
    assert s1["00201208"]["Value"] == [5]  # NumberOfStudyRelatedInstances
    assert s1["00080061"]["Value"] == ["CT"]  # ModalitiesInStudy
    assert s1["00100010"]["Value"] == [{"Alphabetic": "Doe^John"}]
    assert s1["00081190"]["Value"] == [f"{loaded_web.url}/studies/{SPECS[0].study_uid}"]
    for tag in ("00080020", "00080030", "00080050", "00100020", "00100030", "00100040",
                "00200010", "00080090"):
        assert tag in s1


@pytest.mark.parametrize(("params", "expected"), [
    ({"PatientID": "QR1"}, [1, 2]),
    ({"00100020": "QR2"}, [3]),  # 8-hex tag
    ({"PatientName": "Doe*"}, [1, 2]),  # wildcard
    ({"PatientName": "?oe^Jane"}, [3]),
    ({"StudyDate": "20200101-20201231"}, [1, 2]),  # date range
    ({"StudyDate": "-20200301"}, [1]),
    ({"StudyDate": "20210101-"}, [3]),
    ({"StudyTime": "1400-2359"}, [2, 3]),  # time range
    ({"ModalitiesInStudy": "MR"}, [2, 3]),
    ({"AccessionNumber": "A3"}, [3]),
    ({"StudyInstanceUID": f"{SPECS[0].study_uid},{SPECS[-1].study_uid}"}, [1, 3]),  # UID list
    ({"StudyInstanceUID": f"{SPECS[0].study_uid}\\{SPECS[5].study_uid}"}, [1, 2]),
    ({"PatientID": "nobody"}, []),
])
def test_study_matching(loaded_web: Any, params: dict[str, str], expected: list[int]) -> None:
    r = _get(loaded_web, "/studies", params)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/dicom+json"
    got = sorted(_uids(r.json(), "0020000D"))
    assert got == [f"1.2.826.0.1.3680043.10.1137.{n}" for n in expected]


def test_no_match_is_200_empty_array(loaded_web: Any) -> None:
    r = _get(loaded_web, "/studies", {"PatientID": "nobody"})
    assert (r.status_code, r.text) == (200, "[]")


def test_series_and_instances_at_every_level(loaded_web: Any) -> None:
    c = client(loaded_web.url, "reader")
    st = SPECS[0].study_uid
    series = c.search_for_series(st)
    assert sorted(_uids(series, "0020000E")) == [f"{st}.1", f"{st}.2"]
    one = next(s for s in series if s["0020000E"]["Value"] == [f"{st}.1"])
    assert one["00201209"]["Value"] == [3]  # NumberOfSeriesRelatedInstances
    assert one["00080060"]["Value"] == ["CT"]
    assert one["00081190"]["Value"] == [f"{loaded_web.url}/studies/{st}/series/{st}.1"]
    inst = c.search_for_instances(st, f"{st}.1")
    assert sorted(_uids(inst, "00080018")) == [f"{st}.1.{k}" for k in (1, 2, 3)]
    assert inst[0]["00280010"]["Value"] == [8]
    # across levels
    all_series = c.search_for_series(search_filters={"Modality": "MR"})
    assert len(all_series) == 2 and all("00100010" in s for s in all_series)
    all_inst = c.search_for_instances(search_filters={"PatientID": "QR2"})
    assert len(all_inst) == 3
    study_inst = c.search_for_instances(st)
    assert len(study_inst) == 5


def test_includefield_limit_offset(loaded_web: Any) -> None:
    r = _get(loaded_web, "/instances", {"includefield": "00200032,SliceThickness"})
    assert r.status_code == 200
    first = r.json()[0]
    assert "00200032" in first and "00180050" in first  # not in the index: returned empty
    r = _get(loaded_web, "/series", {"includefield": "all"})
    assert "00081030" in r.json()[0] and "00200011" in r.json()[0]
    all_inst = _uids(_get(loaded_web, "/instances").json(), "00080018")
    assert len(all_inst) == len(SPECS)
    page = _uids(_get(loaded_web, "/instances", {"limit": 3, "offset": 2}).json(), "00080018")
    assert page == all_inst[2:5]


def test_bad_requests(loaded_web: Any) -> None:
    assert _get(loaded_web, "/studies", {"NoSuchKeyword": "x"}).status_code == 400
    assert _get(loaded_web, "/studies", {"StudyDate": "yesterday"}).status_code == 400
    assert _get(loaded_web, "/studies", {"limit": "-1"}).status_code == 400
    r = _get(loaded_web, "/studies", Accept="application/dicom+xml")
    assert r.status_code == 406
    assert _get(loaded_web, "/studies", Accept="*/*").status_code == 200
    r = _get(loaded_web, "/studies", {"fuzzymatching": "true"})
    assert r.status_code == 200 and "fuzzymatching" in r.headers["warning"]


def test_synthetic_filter(loaded_web: Any) -> None:
    from pydicom import Dataset

    from tests.support.dimse import make_dataset, part10

    ds: Dataset = make_dataset(SPECS[0])
    ds.SOPInstanceUID = SPECS[0].study_uid + ".7.1"
    ds.SeriesInstanceUID = SPECS[0].study_uid + ".7"
    ds.SeriesDescription = "SYNTHETIC denoise"
    ds.SyntheticData = "YES"
    part10(ds)
    client(loaded_web.url).store_instances([ds])
    syn = _get(loaded_web, "/series", {"SyntheticData": "YES"}).json()
    assert _uids(syn, "0020000E") == [ds.SeriesInstanceUID]
    assert syn[0]["0008103E"]["Value"] == ["SYNTHETIC denoise"]
    assert syn[0]["0008001C"]["Value"] == ["YES"]
    studies = _get(loaded_web, "/studies", {"SyntheticData": "YES"}).json()
    assert _uids(studies, "0020000D") == [SPECS[0].study_uid]
    inst = _get(loaded_web, "/instances", {"SyntheticData": "YES"}).json()
    assert _uids(inst, "00080018") == [ds.SOPInstanceUID]
    not_syn = _get(loaded_web, f"/studies/{SPECS[0].study_uid}/series",
                   {"SyntheticData": "NO"}).json()
    assert sorted(_uids(not_syn, "0020000E")) == [f"{SPECS[0].study_uid}.{i}" for i in (1, 2)]


def test_reads_are_ledger_entries_with_patient_digests(loaded_web: Any) -> None:
    _get(loaded_web, "/studies", {"PatientID": "QR1"})
    loaded_web.flush()
    (ev,) = [e for e in ledger_events(loaded_web.node, "query")
             if e.payload.get("service") == "QIDO-RS"]
    assert ev.actor == "token:reader"
    assert ev.payload["matches"] == 2 and ev.payload["keys"] == ["PatientID"]
    assert sorted(ev.payload["study_uids"]) == STUDIES[:2]
    assert len(ev.payload["patients"]) == 1  # keyed digest of patient QR1, not the ID
    assert "QR1" not in str(ev.payload["patients"])
