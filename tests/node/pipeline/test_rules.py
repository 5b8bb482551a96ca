"""Routing rules: matching fields, keywords, tags and numbers; first match wins; loop guard."""
from __future__ import annotations

import pytest

from audit.watermark import WatermarkKey, embed, make_payload
from config.sections.pipeline import Destination, PipelineSettings, Rule, TaskSpec
from engine.api import Provenance
from node.dicom.series import SeriesSpec, build_series
from node.dicom.volume import assemble
from node.dispatch.dispatcher import watermark_check
from node.pipeline.rules import SeriesFacts, check_rules, route
from tests.support.factory import make_series

T = [TaskSpec(task="ct_denoise")]


def _settings(*rules: Rule) -> PipelineSettings:
    return PipelineSettings(rules=list(rules))


def _facts(**kw: object) -> SeriesFacts:
    series = make_series(3, rows=32, cols=32)
    return SeriesFacts.from_datasets(series, called_ae="SYNTHNODE", calling_ae="CT_SCANNER", **kw)  # type: ignore[arg-type]


def test_first_matching_rule_wins_with_reasons() -> None:
    s = _settings(
        Rule(name="mr", match={"modality": "MR"}, tasks=T),
        Rule(name="ct-head", match={"modality": "CT", "body_part": "head|brain",
                                    "series_description": ".*phantom.*"}, tasks=T),
        Rule(name="catch-all", tasks=T),
    )
    r = route(s, _facts())
    assert r.rule is not None and r.rule.name == "ct-head"
    mr, head, catch = r.verdicts
    assert not mr.matched and "modality 'CT' does not match 'MR'" in mr.reasons
    assert head.matched and any("body_part 'HEAD' matches" in x for x in head.reasons)
    assert catch.matched  # evaluated and shown, but the first match won


@pytest.mark.parametrize(
    ("key", "pattern", "ok"),
    [
        ("called_ae", "SYNTH.*", True),
        ("calling_ae", "MR_.*", False),
        ("rows", ">=32", True),
        ("rows", ">32", False),
        ("instances", "==3", True),
        ("image_size", "32x32", True),
        ("sop_class", "CT Image Storage", True),
        ("sop_class", r"1\.2\.840\.10008\.5\.1\.4\.1\.1\.2", True),
        ("Manufacturer", "phantom.*", True),  # any keyword, case-insensitive
        ("(0018,0050)", "2.5", True),  # tag form: Slice Thickness
        ("ImageType", r"ORIGINAL\\PRIMARY.*", True),  # multi-valued: joined with backslash
        ("ImageType", "AXIAL", True),  # ... or any single value
        ("ProtocolName", ".*", False),  # absent attribute never matches
    ],
)
def test_match_entries(key: str, pattern: str, ok: bool) -> None:
    r = route(_settings(Rule(name="r", match={key: pattern}, tasks=T)), _facts())
    assert (r.rule is not None) is ok, r.verdicts[0].reasons


def test_loop_guard_synthetic_and_watermark() -> None:
    s = _settings(Rule(name="all", tasks=T))
    src = assemble(make_series(2, rows=256, cols=256))
    prov = Provenance("ct_denoise", "m", "1", "ab" * 32, {}, 1, "cpu", 1, 0.0)
    built = build_series(src, src.volume, SeriesSpec("sc", prov))
    r = route(s, SeriesFacts.from_datasets(built.datasets))
    assert r.rule is None and "Synthetic Data" in (r.skipped or "")
    # SyntheticData stripped (e.g. by a PACS), but our watermark is still in the pixels
    key = WatermarkKey.generate(2)
    marked = build_series(src, src.volume, SeriesSpec("sc", prov),
                          mark=lambda a: embed(a, key, make_payload(2, 1), bits_stored=16, signed=False))
    for ds in marked.datasets:
        del ds.SyntheticData
    facts = SeriesFacts.from_datasets(marked.datasets, watermark=watermark_check([key]))
    r = route(s, facts)
    assert r.rule is None and "watermark" in (r.skipped or "")
    originals = SeriesFacts.from_datasets(make_series(2, rows=256, cols=256),
                                          watermark=watermark_check([key]))
    assert route(s, originals).rule is not None


def test_disabled_rule_and_pipeline() -> None:
    s = _settings(Rule(name="off", enabled=False, tasks=T))
    assert route(s, _facts()).rule is None
    s2 = PipelineSettings(enabled=False, rules=[Rule(name="r", tasks=T)])
    assert route(s2, _facts()).skipped == "pipeline disabled"


def test_rule_set_checks_and_settings_validation() -> None:
    s = _settings(Rule(name="a", match={"NoSuchKeyword": "x", "modality": "(", "rows": ">=2"}))
    problems = check_rules(s)
    assert any("unknown match key 'NoSuchKeyword'" in p for p in problems)
    assert any("bad regex" in p for p in problems)
    # neither tasks nor destinations: a hold rule, not a mistake; destinations but no tasks is
    assert not any("no tasks" in p for p in problems)
    s = PipelineSettings(
        destinations=[{"name": "pacs", "kind": "dimse", "ae_title": "PACS", "host": "h",
                       "port": 104}],
        rules=[Rule(name="b", destinations=["pacs"])])
    assert any("rule 'b': no tasks" in p for p in check_rules(s))
    with pytest.raises(ValueError, match="unknown destination"):
        PipelineSettings(rules=[Rule(name="a", tasks=T, destinations=["nowhere"])])
    with pytest.raises(ValueError, match="needs url"):
        Destination(name="w", kind="dicomweb")


def test_rule_task_names_are_the_engines() -> None:
    """A rule naming a task the engine does not have is a problem (with the nearest name);
    every engine task name is accepted."""
    from engine.types import TaskName

    s = _settings(Rule(name="typo", tasks=[TaskSpec(task="ct_denose")]))
    problems = check_rules(s)
    assert any("unknown task 'ct_denose'" in p and "did you mean 'ct_denoise'?" in p
               for p in problems), problems
    ok = _settings(Rule(name="all", tasks=[TaskSpec(task=t.value) for t in TaskName]))
    assert not any("unknown task" in p for p in check_rules(ok))
