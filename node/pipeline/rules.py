"""Declarative routing: which series goes to which engine tasks and destinations, and why.

Rules come from ``[pipeline] rules`` (:mod:`config.sections.pipeline`). A series is
described by :class:`SeriesFacts` (the header of one instance, the instance count and the
AE titles of the association that delivered it). Rules are tried in order; the first
enabled rule whose every ``match`` entry holds routes the series. Each verdict carries one
line per entry saying why it held or failed: ``synthnode rules test`` prints them.

Loop guard: a series whose instances carry Synthetic Data YES, or whose
pixel data carry a detectable watermark of ours, is never routed as an original.
"""
from __future__ import annotations

import json
import logging
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID

from config.sections.pipeline import PipelineSettings, Rule
from storage.synthetic import is_synthetic

logger = logging.getLogger(__name__)

_COMPARE = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*(-?\d+(?:\.\d+)?)\s*$")
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
    ">": operator.gt, "<": operator.lt,
}
NUMERIC_FIELDS = frozenset({"rows", "columns", "instances"})


@dataclass(frozen=True)
class SeriesFacts:
    """What routing may look at for one series."""

    header: Dataset
    instances: int = 1
    called_ae: str | None = None
    calling_ae: str | None = None
    synthetic: bool = False  # any instance with SyntheticData YES
    watermarked: bool = False  # a watermark of ours was detected

    def field(self, key: str) -> Any:
        """Value of a named field, DICOM keyword or tag; None when absent."""
        h = self.header
        named: dict[str, Callable[[], Any]] = {
            "called_ae": lambda: self.called_ae,
            "calling_ae": lambda: self.calling_ae,
            "modality": lambda: h.get("Modality"),
            "body_part": lambda: h.get("BodyPartExamined"),
            "series_description": lambda: h.get("SeriesDescription"),
            "sop_class": lambda: h.get("SOPClassUID"),
            "rows": lambda: h.get("Rows"),
            "columns": lambda: h.get("Columns"),
            "image_size": lambda: f"{h.get('Rows')}x{h.get('Columns')}" if "Rows" in h else None,
            "instances": lambda: self.instances,
        }
        if key in named:
            return named[key]()
        tag = _tag(key)
        if tag is None or tag not in h:
            return None
        value = h[tag].value
        return value

    @classmethod
    def from_datasets(
        cls,
        datasets: Sequence[Dataset],
        *,
        called_ae: str | None = None,
        calling_ae: str | None = None,
        watermark: Callable[[Dataset], bool] | None = None,
    ) -> SeriesFacts:
        if not datasets:
            raise ValueError("a series needs at least one instance")
        synthetic = any(is_synthetic(ds) for ds in datasets)
        marked = False
        if watermark is not None and not synthetic:
            # one probe is enough to recognise a marked series (the mark is in every slice)
            probe = datasets[len(datasets) // 2]
            marked = "PixelData" in probe and watermark(probe)
        return cls(datasets[0], len(datasets), called_ae, calling_ae, synthetic, marked)


def _tag(key: str) -> int | None:
    k = key.strip()
    m = re.fullmatch(r"\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?", k)
    if m:
        return int(Tag(int(m.group(1), 16), int(m.group(2), 16)))
    t = tag_for_keyword(k)
    return int(t) if t is not None else None


def valid_match_key(key: str) -> bool:
    return key in _NAMED_KEYS or _tag(key) is not None


_NAMED_KEYS = frozenset(
    {"called_ae", "calling_ae", "modality", "body_part", "series_description", "sop_class",
     "rows", "columns", "image_size", "instances"}
)


def _as_text(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return ["\\".join(str(v) for v in value)] + [str(v) for v in value]
    return [str(value)]


def check_entry(facts: SeriesFacts, key: str, pattern: str) -> tuple[bool, str]:
    """One match entry: (holds, explanation)."""
    value = facts.field(key)
    cmp = _COMPARE.match(pattern)
    if cmp and (key in NUMERIC_FIELDS or isinstance(value, (int, float))):
        op, ref = cmp.group(1), float(cmp.group(2))
        try:
            num = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False, f"{key} is {value!r}, not a number for {pattern!r}"
        ok = _OPS[op](num, ref)
        return ok, f"{key} {num:g} {'satisfies' if ok else 'fails'} {pattern.strip()}"
    texts = _as_text(value)
    if key == "sop_class" and value is not None:
        texts.append(UID(str(value)).name)
    if not texts:
        return False, f"{key} is absent (needs {pattern!r})"
    try:
        rx = re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        return False, f"{key}: invalid regex {pattern!r} ({exc})"
    for t in texts:
        if rx.fullmatch(t):
            return True, f"{key} {t!r} matches {pattern!r}"
    return False, f"{key} {texts[0]!r} does not match {pattern!r}"


@dataclass(frozen=True)
class Verdict:
    rule: str
    matched: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Routing:
    """The outcome for one series: the chosen rule (or None) and every rule's verdict."""

    rule: Rule | None
    verdicts: tuple[Verdict, ...] = field(default=())
    skipped: str | None = None  # loop guard / pipeline disabled: why nothing was evaluated


def evaluate(rule: Rule, facts: SeriesFacts) -> Verdict:
    if not rule.enabled:
        return Verdict(rule.name, False, ("rule disabled",))
    reasons = []
    ok = True
    for key, pattern in rule.match.items():
        held, why = check_entry(facts, key, pattern)
        reasons.append(why)
        ok = ok and held
    if not rule.match:
        reasons.append("no match entries: matches every original series")
    return Verdict(rule.name, ok, tuple(reasons))


def route(settings: PipelineSettings, facts: SeriesFacts) -> Routing:
    """First matching rule for ``facts``; synthetic or watermarked series are never routed."""
    if not settings.enabled:
        return Routing(None, (), "pipeline disabled")
    if facts.synthetic:
        return Routing(None, (), "loop guard: Synthetic Data (0008,001C) is YES")
    if facts.watermarked:
        return Routing(None, (), "loop guard: a synthnode watermark was detected in the pixel data")
    verdicts = []
    chosen: Rule | None = None
    for rule in settings.rules:
        v = evaluate(rule, facts)
        verdicts.append(v)
        if v.matched and chosen is None:
            chosen = rule
    if chosen is not None:
        logger.debug("series routed by rule %s", chosen.name)
    return Routing(chosen, tuple(verdicts))


def hold_reason(rule: Rule) -> str | None:
    """Why a series routed by ``rule`` is held, or None. A rule with neither tasks nor
    destinations (nor ``forward_originals``) is a *hold rule*: placed before the processing
    rules (the first matching rule wins), it keeps the series it matches (phantom / QA /
    calibration series, e.g. on Series Description or Protocol Name) out of every task and
    destination; the series stays stored and ``study show`` names the rule."""
    if rule.tasks or rule.destinations or rule.forward_originals:
        return None
    return f"held by rule {rule.name!r} (no tasks, no destinations): not processed"


@dataclass(frozen=True)
class RuleProblem:
    """A mistake in the rule set: the settings path it is at (``pipeline.rules.1.match.rows``),
    what is wrong, and a suggestion (``did you mean 'Modality'?``) when there is one."""

    path: str
    reason: str
    hint: str | None = None


def _suggest_key(key: str) -> str | None:
    import difflib

    from pydicom.datadict import keyword_dict

    named = difflib.get_close_matches(key, sorted(_NAMED_KEYS), n=2, cutoff=0.6)
    words = named or difflib.get_close_matches(key, list(keyword_dict), n=2, cutoff=0.75)
    return ("did you mean " + " or ".join(repr(w) for w in words) + "?") if words else None


def _entry_problem(rule: Rule, key: str, pattern: str, path: str) -> RuleProblem | None:
    if not valid_match_key(key):
        return RuleProblem(path, f"rule {rule.name!r}: unknown match key {key!r}: neither a named "
                                 "field (modality, rows, ...) nor a DICOM keyword or tag",
                           _suggest_key(key))
    if _COMPARE.match(pattern):
        return None
    if key in NUMERIC_FIELDS and re.match(r"^\s*[<>=!]", pattern):
        return RuleProblem(path, f"rule {rule.name!r}: {key} = {pattern!r} is not a comparison "
                                 "(write an operator and a number, e.g. \">=256\")")
    try:
        re.compile(pattern)
    except re.error as exc:
        return RuleProblem(path, f"rule {rule.name!r}: bad regex for {key!r}: {exc}")
    return None


def rule_problems(settings: PipelineSettings,
                  models_dir: Path | None = None) -> list[RuleProblem]:
    """Mistakes in the rule set that the settings schema cannot see: unknown match keys,
    malformed comparisons on numeric fields, bad regular expressions, rules without tasks,
    unknown tasks and task parameters (with a suggestion), and with ``models_dir`` tasks or
    models with no installed model."""
    problems: list[RuleProblem] = []
    for i, rule in enumerate(settings.rules):
        for key, pattern in rule.match.items():
            p = _entry_problem(rule, key, pattern, f"pipeline.rules.{i}.match.{key}")
            if p is not None:
                problems.append(p)
        if not rule.tasks and rule.destinations and not rule.forward_originals:
            problems.append(RuleProblem(
                f"pipeline.rules.{i}.tasks",
                f"rule {rule.name!r}: no tasks: its destinations get nothing (a rule with "
                "neither tasks nor destinations is a hold rule)"))
        for k, task in enumerate(rule.tasks):
            problems += task_problems(rule.name, task.task, dict(task.params), task.model,
                                      f"pipeline.rules.{i}.tasks.{k}", models_dir)
    return problems


def _did_you_mean(word: str, known: Iterable[str]) -> str | None:
    import difflib

    close = difflib.get_close_matches(word, [str(k) for k in known], n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


def installed_models(models_dir: Path) -> list[dict[str, Any]]:
    """Manifests (model_id, task, ...) of the model folders in ``models_dir`` (one level, and
    ``experimental/``); approval is the model gate's business, checked when a job runs."""
    found = []
    for manifest in sorted([*models_dir.glob("*/manifest.json"),
                            *models_dir.glob("*/*/manifest.json")]):
        try:
            found.append(json.loads(manifest.read_text()))
        except (OSError, ValueError):
            continue
    return found


def task_problems(rule: str, task: str, params: dict[str, Any], model: str | None, path: str,
                  models_dir: Path | None = None) -> list[RuleProblem]:
    """A rule's task checked against the engine's task registry (name, parameter names,
    types and ranges) and, with ``models_dir``, against the installed models (one for the
    task, or the named one)."""
    from engine.tasks import TASKS, TaskInputError

    spec = TASKS.get(task)
    if spec is None:
        return [RuleProblem(f"{path}.task", f"rule {rule!r}: unknown task {task!r} (known: "
                                            f"{', '.join(sorted(TASKS))})",
                            _did_you_mean(task, TASKS))]
    out = []
    for name, value in params.items():
        p = spec.params.get(name)
        if p is None:
            out.append(RuleProblem(f"{path}.params.{name}",
                                   f"rule {rule!r}: task {task} has no parameter {name!r} "
                                   f"(known: {', '.join(sorted(spec.params))})",
                                   _did_you_mean(name, spec.params)))
            continue
        try:
            p.coerce(name, value)
        except TaskInputError as exc:
            out.append(RuleProblem(f"{path}.params.{name}", f"rule {rule!r}: {exc}"))
    if models_dir is not None and models_dir.is_dir():
        manifests = installed_models(models_dir)
        if model is not None and not any(m.get("model_id") == model for m in manifests):
            out.append(RuleProblem(f"{path}.model", f"rule {rule!r}: no model {model!r} in "
                                                    f"{models_dir}",
                                   _did_you_mean(model, [str(m.get("model_id"))
                                                         for m in manifests])))
        elif model is None and not any(m.get("task") == task for m in manifests):
            out.append(RuleProblem(f"{path}.task", f"rule {rule!r}: no model for task {task!r} "
                                                   f"in {models_dir}"))
    return out


def check_rules(settings: PipelineSettings, models_dir: Path | None = None) -> list[str]:
    """Problems in the rule set a config check should report (unknown keys, bad regexes,
    unknown tasks / parameters, missing models)."""
    return [p.reason + (f" ({p.hint})" if p.hint else "")
            for p in rule_problems(settings, models_dir)]
