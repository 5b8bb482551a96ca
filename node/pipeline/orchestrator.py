"""The pipeline: completed study -> routing -> engine jobs -> synthetic series -> dispatch jobs.

Stages (mercure-style router / processor / dispatcher, one bookkeeper each):

1. ingest hook (:meth:`Pipeline.on_instance_stored`) feeds
   :class:`~node.pipeline.completion.StudyTracker` (instances the pipeline stored itself, and
   any with Synthetic Data YES, are ignored);
2. on completion (:meth:`Pipeline.on_study_complete`) every series of the study is routed
   (:mod:`node.pipeline.rules`, loop guard included) and one engine job per task of the
   matching rule is queued, unless a job for the same source instances exists (a re-sent or
   unchanged series never runs twice); for a re-opened study the re-process policy decides;
3. an engine job (:meth:`Pipeline.run_engine_job`) reads the series from the store, assembles
   the volume, runs the engine (through the model gate), applies the quality gate, builds
   the output series with the watermark, records it as ``building``, stores it in the node
   (so C-FIND / QIDO see it), then in one transaction marks it ``complete``, records
   ``output.created`` and queues one dispatch job per destination. A series still
   ``building`` is the partial output of an attempt that died: the next attempt (or the
   node's start) removes it through storage's delete path and records ``output.discarded``;
4. a dispatch job (:meth:`Pipeline.run_dispatch_job`) makes one send attempt per job attempt,
   records every acknowledged instance in ``pipeline_dispatch_acks`` (never re-sent, also
   after a restart) and retries with the destination's exponential backoff.

The database is the truth about jobs (:class:`~node.pipeline.jobs.JobStore` is their one
bookkeeper: this module never touches the jobs table). The local worker pool polls it; with
``pipeline.broker_url`` set, Celery (:mod:`node.pipeline.broker`) carries the same job ids to
``synthnode worker`` processes.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import Connection, Engine, and_, select, update

from audit.events import Event, EventType, Outcome
from audit.ledger import Ledger
from audit.watermark import WatermarkKey
from audit.watermark.fidelity import FidelityBound
from config.sections.pipeline import Destination, PipelineSettings, ReprocessPolicy, Rule
from engine.api import Provenance, TaskResult, Volume
from node.context import NodeContext
from node.dicom import codes
from node.dicom.series import SeriesSpec, build_series
from node.dicom.volume import (
    AssembledVolume,
    Reason,
    VolumeError,
    assemble,
    assemble_split,
    leave_out_reason,
)
from node.dispatch.base import DispatchState
from node.dispatch.dispatcher import Dispatcher, watermark_check
from node.ingest.results import StoredInstance
from node.pipeline.completion import StudyTracker
from node.pipeline.jobs import (
    Job,
    JobClaimLost,
    JobKind,
    JobState,
    JobStore,
    PermanentJobError,
    TransientJobError,
    WorkerPool,
)
from node.pipeline.preview import expire_held_slices, forget_held_slices, save_held_slices
from node.pipeline.quality import QualityLimits, check
from node.pipeline.rules import SeriesFacts, hold_reason, route
from node.pipeline.runner import EngineRunner, GatedEngineRunner
from node.pipeline.specs import DispatchJobSpec, EngineJobSpec
from node.pipeline.tables import dispatch_acks, outputs
from storage.filestore import FileStore
from storage.index import Index, IndexedInstance
from storage.synthetic import is_synthetic

logger = logging.getLogger(__name__)

ACTOR = "component:pipeline"
#: how often the pictures of undecided held outputs are checked against their retention
HELD_RETENTION_CHECK_S = 3600.0
SOURCE = "pipeline"  # ingest source of the outputs the pipeline stores
OUTPUT_BUILDING = "building"  # pipeline_outputs.state: instances being stored
OUTPUT_COMPLETE = "complete"  # output.created + dispatch jobs written (one transaction)
#: assembly failures where the largest regular stack of a series is processed and the other
#: objects are left out (a missing slice or uneven spacing is refused: the volume would
#: not be continuous)
SPLITTABLE = (Reason.DIFFERENT_SIZES, Reason.MIXED_ORIENTATION, Reason.DIFFERENT_PIXEL_SPACING,
              Reason.MIXED_FRAME_OF_REFERENCE)

def _now() -> datetime:
    return datetime.now(UTC)


def job_outcome(held: Sequence[Any], refused: Sequence[Any]) -> str:
    """An engine job's outcome: ``held`` (the quality gate held an output), ``refused`` (an
    output is not dispatched: its mark could not be verified) or ``passed``."""
    return "held" if held else "refused" if refused else "passed"


def fingerprint(sop_uids: Sequence[str]) -> str:
    """Identity of a set of source instances (order-free)."""
    return hashlib.sha256("\n".join(sorted(sop_uids)).encode()).hexdigest()


def output_uid_seed(job: Job, prov: Provenance, index: int) -> str:
    """What an output's UIDs are derived from: the source instances, the task, the model
    (id, version, weights digest), the filled-in parameters, the seed, the output format, the
    output's index and the job's attempt. The same job on the same input gives the same UIDs
    (a re-run, `jobs retry` or a new job for the same series, starts at attempt 1 and
    replaces the series in PACS instead of adding one); any change gives new ones. The
    attempt keeps the partial series of an attempt that died (never dispatched, discarded)
    apart from the series its successor builds, also while a stale attempt that lost its
    claim still stores."""
    import json

    return json.dumps({
        "source": job.engine_spec.fingerprint, "series": job.series_uid, "task": job.task,
        "model": [prov.model_id, prov.model_version, prov.weights_sha256],
        "params": prov.parameters, "seed": prov.seed,
        "format": job.engine_spec.output_format, "index": index, "attempt": job.attempts,
    }, sort_keys=True, default=str)


def output_series_uid(seed_text: str) -> str:
    """The Series Instance UID of an output, derived from :func:`output_uid_seed`."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[seed_text, "series"]))


def mark_id_for(series_uid: str) -> int:
    """40-bit watermark mark id derived from the output Series Instance UID."""
    from audit.watermark import MARK_ID_BITS

    return int.from_bytes(hashlib.sha256(series_uid.encode()).digest()[:8], "big") & (
        (1 << MARK_ID_BITS) - 1
    )


@dataclass(frozen=True)
class Parts:
    """What the pipeline needs from the node (a :class:`node.context.NodeContext` has it)."""

    settings: PipelineSettings
    engine: Engine
    store: FileStore
    index: Index
    ledger: Ledger  # the ledger (its one append API writes)
    ingest: Callable[[bytes], StoredInstance]  # stores one Part 10 file


class Pipeline:
    """Routing, engine and dispatch jobs on one node.

    Parameters
    ----------
    parts
        node services (see :meth:`from_context`).
    runner
        engine runner (:class:`GatedEngineRunner` in production).
    mark_key
        watermark key used to mark outputs; None = outputs are not marked (and dispatch
        will refuse them).
    detect_keys
        keys whose marks identify our outputs (loop guard, dispatch policy); default
        ``[mark_key]``.
    fidelity
        the watermark's fidelity bound (``audit.watermark.fidelity.FidelityBound``: HU
        outputs max |change| 4 HU, other outputs 2 stored units and PSNR >= 50 dB by default;
        ``watermark.*`` settings); recorded with every output in ``output.created``.
    """

    #: where the middle slices of held outputs are kept for the console's pictures
    #: (:mod:`node.pipeline.preview`); ``from_context`` sets ``<data_dir>/held``
    held_dir: Path | None = None
    #: retention of those slices when no one decides (``storage.retention_days``; None: kept
    #: until a decision); checked at start and every ``HELD_RETENTION_CHECK_S``
    held_retention_days: int | None = None

    def __init__(self, parts: Parts, *, runner: EngineRunner | None = None,
                 mark_key: WatermarkKey | None = None,
                 detect_keys: Sequence[WatermarkKey] | None = None,
                 fidelity: FidelityBound | None = None) -> None:
        self.parts = parts
        self.settings = parts.settings
        self._retention_stop = threading.Event()
        self.runner = runner
        self.mark_key = mark_key
        self.fidelity = fidelity or FidelityBound()
        keys = list(detect_keys) if detect_keys is not None else ([mark_key] if mark_key else [])
        self.detect_keys = keys
        self.detect = watermark_check(keys) if keys else None
        self.jobs = JobStore(parts.engine, parts.ledger, lease_s=self.settings.lease_s)
        self.tracker = StudyTracker(
            parts.engine, self.settings, ledger=parts.ledger, on_complete=self.on_study_complete,
            series_of=self._series_of,
        )
        self.dispatcher = Dispatcher(
            self.settings.destinations, ledger=parts.ledger, watermark=self.detect,
            calling_ae=self.settings.calling_ae,
        )
        self.pool = WorkerPool(
            self.jobs,
            {JobKind.ENGINE: self.run_engine_job, JobKind.DISPATCH: self.run_dispatch_job},
            workers=self.settings.workers,
            poll_s=self.settings.poll_s,
            backoff_s=self.settings.retry_backoff_s,
        )
        if (
            self.settings.broker_url
        ):  # scale-out: the broker carries job ids (node/pipeline/broker.py)
            from node.pipeline.broker import BrokerPool

            self.pool = BrokerPool(  # type: ignore[assignment]
                self.jobs, self.settings.broker_url,
                stale_after_s=self.settings.broker_stale_after_s,
                sweep_every_s=self.settings.broker_sweep_every_s)
        self.limits = QualityLimits.from_settings(self.settings.quality)

    @classmethod
    def from_context(cls, ctx: NodeContext, **kwargs: Any) -> Pipeline:
        from node.ingest.ingestor import Ingestor

        ingestor = Ingestor(ctx)
        parts = Parts(
            settings=ctx.settings.pipeline, engine=ctx.engine, store=ctx.store, index=ctx.index,
            ledger=ctx.ledger,
            ingest=lambda data: ingestor.ingest_part10(data, source=SOURCE),
        )
        pipeline = cls(parts, **kwargs)
        pipeline.held_dir = ctx.settings.data_dir / "held"
        pipeline.held_retention_days = ctx.settings.storage.retention_days
        ctx.on_instance_stored.append(pipeline.on_instance_stored)
        return pipeline

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.tracker.start_scheduler()
        # partial output series of attempts that died, whose job is not running now (failed,
        # cancelled, queued); a running job's next attempt discards its own
        self.discard_partial_outputs(reason="partial output of an attempt that died "
                                            "(found at start-up)")
        self.pool.start()
        if self.held_retention_days is not None and self.held_dir is not None:
            threading.Thread(target=self._held_retention_loop, daemon=True,
                             name="synthnode-held-retention").start()

    def stop(self) -> None:
        self._retention_stop.set()
        self.pool.stop()
        self.tracker.shutdown()
        self.dispatcher.close()

    # -- helpers -----------------------------------------------------------------------------
    def _event(self, type_: EventType, subject: dict[str, Any], payload: dict[str, Any],
               outcome: Outcome = Outcome.SUCCESS) -> None:
        self.parts.ledger.append(Event(type=type_, actor=ACTOR, outcome=outcome,
                                       subject=subject, payload=payload))

    def _left_out(self, study_uid: str, series_uid: str, sop_uid: str, reason: str,
                  extra: dict[str, Any]) -> None:
        logger.info("left out of the volume: %s (%s)", sop_uid, reason)
        self._event(EventType.INSTANCE_LEFT_OUT,
                    {"study_uid": study_uid, "series_uid": series_uid, "sop_uid": sop_uid},
                    {"reason": reason, **extra}, Outcome.SUCCESS)

    def _series_of(self, study_uid: str) -> list[str]:
        return sorted({i.series_instance_uid for i in
                       self.parts.index.instances(study_instance_uid=study_uid)})

    def _read(self, rel_path: str, *, headers_only: bool = False) -> Dataset:
        data = self.parts.store.read(rel_path)
        return pydicom.dcmread(BytesIO(data), stop_before_pixels=headers_only)

    def _complete_output(self, series_uid: str) -> bool:
        with self.parts.engine.connect() as c:
            return c.execute(select(outputs.c.series_uid).where(and_(
                outputs.c.series_uid == series_uid,
                outputs.c.state == OUTPUT_COMPLETE))).first() is not None

    def _our_output(self, series_uid: str) -> bool:
        with self.parts.engine.connect() as c:
            return c.execute(select(outputs.c.series_uid).where(
                outputs.c.series_uid == series_uid)).first() is not None

    # -- stage 1: ingest hook -----------------------------------------------------------------
    def on_instance_stored(self, info: StoredInstance) -> None:
        rec = info.record
        if rec.source == SOURCE:
            return
        if is_synthetic(rec.synthetic_data):
            logger.info("synthetic instance received: study not (re)opened")
            return
        self.tracker.instance_received(rec.study_instance_uid, called_ae=rec.called_ae,
                                       calling_ae=rec.calling_ae)

    def complete_study(self, study_uid: str, trigger: str = "manual") -> bool:
        """Explicit completion trigger (``synthnode study complete UID``)."""
        return self.tracker.complete(study_uid, trigger=trigger)

    # -- stage 2: routing ----------------------------------------------------------------------
    def on_study_complete(self, study_uid: str, generation: int, *,
                          force: bool = False) -> list[str]:
        """Route every series of the study; queue engine jobs. Returns the new job ids.
        ``force`` (``study reprocess``): queue a job per matching rule and task even where
        one for the same source instances exists (its outputs replace the earlier ones; an
        unchanged job gives the same output UIDs and builds nothing new)."""
        status = self.tracker.status(study_uid)
        instances = self.parts.index.instances(study_instance_uid=study_uid)
        by_series: dict[str, list[IndexedInstance]] = {}
        for inst in instances:
            by_series.setdefault(inst.series_instance_uid, []).append(inst)
        queued: list[str] = []
        for series_uid, insts in sorted(by_series.items()):
            if self._our_output(series_uid):
                continue
            headers = [self._read(i.file_path, headers_only=True) for i in insts]
            reasons = [leave_out_reason(h) for h in headers]
            if all(reasons) and not any(is_synthetic(h) for h in headers):
                # a localizer / dose report / screenshot series: nothing to process; each
                # object is named in the ledger, the study goes on
                for inst, why in zip(insts, reasons, strict=True):
                    self._left_out(study_uid, series_uid, inst.sop_instance_uid, str(why),
                                   {"routing": "series not routed"})
                continue
            synthetic = any(is_synthetic(h) for h in headers)
            marked = False
            if not synthetic and self.detect is not None:
                probe = self._read(insts[len(insts) // 2].file_path)
                marked = "PixelData" in probe and self.detect(probe)
            facts = SeriesFacts(headers[0], len(headers),
                                status.called_ae if status else None,
                                status.calling_ae if status else None, synthetic, marked)
            routing = route(self.settings, facts)
            if routing.rule is None:
                logger.info("series not routed: %s", routing.skipped or "no rule matched")
                continue
            rule = routing.rule
            held = hold_reason(rule)
            if held is not None:
                # a phantom / QA / calibration series: stored, never processed; each object
                # named in the ledger like the other objects that are not processed
                logger.info("series %s %s", series_uid, held)
                for inst in insts:
                    self._left_out(study_uid, series_uid, inst.sop_instance_uid, held,
                                   {"routing": "held by rule", "rule": rule.name})
                continue
            fp = fingerprint([i.sop_instance_uid for i in insts])
            if rule.forward_originals:
                queued += self._forward_original(study_uid, series_uid, rule, fp, generation)
            for k, task in enumerate(rule.tasks):
                decision = "replace" if force else self._reprocess_decision(
                    series_uid,
                    rule.name,
                    task.task,
                    fp,
                    generation,
                    rule.reprocess or self.settings.reprocess,
                )
                if decision is None:
                    continue
                spec = EngineJobSpec(
                    fingerprint=fp, params=task.params, output_format=task.output_format,
                    model=task.model, destinations=tuple(rule.destinations), task_index=k,
                    replace=decision == "replace",
                )
                seed = task.seed if task.seed is not None else int(fp[:12], 16)
                jid = self.jobs.enqueue(
                    JobKind.ENGINE, study_uid=study_uid, series_uid=series_uid, rule=rule.name,
                    task=task.task, spec=spec, seed=seed,
                    max_attempts=self.settings.job_max_attempts, generation=generation,
                )
                queued.append(jid)
        if queued:
            self.pool.wake()
        return queued

    def _forward_original(self, study_uid: str, series_uid: str, rule: Rule, fp: str,
                          generation: int) -> list[str]:
        """Dispatch jobs for the original series itself (scanner -> node -> PACS), once per
        set of source instances and destination."""
        live = self.jobs.find(kind=JobKind.DISPATCH, series_uid=series_uid,
                              exclude_states=(JobState.FAILED, JobState.CANCELLED))
        sent = {(j.dispatch_spec.destination, j.dispatch_spec.fingerprint) for j in live}
        out = []
        for dest in rule.destinations:
            if (dest, fp) in sent:
                continue
            d = self._destination(dest)
            out.append(self.jobs.enqueue(
                JobKind.DISPATCH, study_uid=study_uid, series_uid=series_uid, rule=rule.name,
                spec=DispatchJobSpec(destination=dest, fingerprint=fp, original=True),
                max_attempts=d.max_attempts, generation=generation,
            ))
        return out

    def _reprocess_decision(self, series_uid: str, rule: str, task: str, fp: str,
                            generation: int, policy: ReprocessPolicy) -> str | None:
        """None = do not queue; "new" / "always" / "replace" = queue (and how)."""
        live = self.jobs.find(kind=JobKind.ENGINE, series_uid=series_uid, rule=rule, task=task,
                              exclude_states=(JobState.FAILED, JobState.CANCELLED))
        if any(j.engine_spec.fingerprint == fp for j in live):
            return None  # same source instances: already done or under way
        if not live:
            return "new"
        if policy is ReprocessPolicy.NEVER:
            logger.info("series changed after completion; reprocess policy 'never'")
            return None
        return policy.value

    # -- stage 3: engine job -------------------------------------------------------------------
    def run_engine_job(self, job: Job) -> dict[str, Any]:
        # a series still "building" was left by an earlier attempt that died mid-store
        # (kill -9, power loss): it is partial, never dispatched; remove it before redoing
        self.discard_partial_outputs(job_id=job.id,
                                     reason=f"left by an earlier attempt; attempt {job.attempts} "
                                            "builds the output again")
        with self.parts.engine.connect() as c:
            rows = c.execute(select(outputs.c.series_uid, outputs.c.held).where(and_(
                outputs.c.job_id == job.id, outputs.c.state == OUTPUT_COMPLETE,
            )).order_by(outputs.c.created_at)).all()
        done = [r[0] for r in rows]
        if done:
            # an earlier attempt recorded its outputs (and their dispatch jobs, in the same
            # transaction) and then died: finish, do not redo
            self._queue_dispatch(job, done)
            refused = [{"series_uid": r[0], "checks": ["watermark_unverified"]}
                       for r in rows if r[1]]
            return {"outputs": done, "held": [], "refused": refused,
                    "outcome": job_outcome([], refused), "resumed": True}
        if self.runner is None:
            raise PermanentJobError("no engine runner configured")
        insts = self.parts.index.instances(series_instance_uid=job.series_uid)
        if not insts:
            raise PermanentJobError(f"source series {job.series_uid} has no instances")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        source, left_out = self._load_source(job, insts)
        timings["load"] = time.perf_counter() - t0
        spec = job.engine_spec
        seed = int(job.seed if job.seed is not None else 0)
        t0 = time.perf_counter()
        result = self._run_engine(job.task or "", source, dict(spec.params), seed, spec.model)
        timings["engine"] = time.perf_counter() - t0
        prov = result.provenance
        built: list[tuple[str, Event, str | None]] = []
        held: list[dict[str, Any]] = []
        released: list[dict[str, Any]] = []
        unchanged: list[str] = []
        started: list[str] = []  # output series this attempt recorded as building
        try:
            for k, out in enumerate(result.outputs):
                t0 = time.perf_counter()
                report = (check(out, source.volume, self.limits)
                          if self.settings.quality.enabled else None)
                timings["quality"] = timings.get("quality", 0.0) + time.perf_counter() - t0
                if report is not None and not report.passed and spec.released_by:
                    # released by an administrator: built anyway, the findings recorded
                    released.append({"index": k, "checks": list(report.checks),
                                     "reasons": list(report.reasons)})
                elif report is not None and not report.passed:
                    held.append({"index": k, "reasons": list(report.reasons),
                                 "checks": list(report.checks)})
                    self._event(EventType.OUTPUT_HELD,
                                {"job_id": job.id, "study_uid": job.study_uid,
                                 "model_id": prov.model_id},
                                {"source_series_uids": [job.series_uid],
                                 "reasons": list(report.reasons), "checks": list(report.checks),
                                 "stats": report.stats, "output_index": k},
                                Outcome.MINOR_FAILURE)
                    self._keep_held_slices(job, k, source.volume, out)
                    continue
                same = output_series_uid(output_uid_seed(job, prov, k))
                if self._complete_output(same):
                    unchanged.append(same)  # this very output is already built and recorded
                    continue
                built.append(self._build_and_store(job, source, out, prov, k,
                                                   report.stats if report else {}, timings,
                                                   started))
            made = self._complete_outputs(job, built)
        except Exception as exc:
            # this attempt failed before its outputs were complete: what it stored is partial
            reason = (f"attempt {job.attempts} failed before its outputs were complete: "
                      f"{type(exc).__name__}: {exc}")[:500]
            try:
                for series_uid in started:
                    self._discard_output(series_uid, reason, orphans_of=job)
            except Exception:
                logger.exception("could not discard the partial outputs of job %s", job.id)
            raise
        refused = [{"series_uid": uid, "reasons": [why], "checks": ["watermark_unverified"]}
                   for uid, _, why in built if why is not None]
        if made:
            self.pool.wake()
        extra: dict[str, Any] = {"unchanged": unchanged} if unchanged else {}
        if left_out:
            extra["left_out"] = left_out
        if spec.released_by:
            extra["quality_released"] = {"from_job": spec.released_from, "by": spec.released_by,
                                         "reason": spec.release_reason, "outputs": released}
        return {"outputs": made, "held": held, "refused": refused,
                "outcome": job_outcome(held, refused), **extra, "model_id": prov.model_id,
                "model_version": prov.model_version,
                "weights_sha256": prov.weights_sha256, "seed": prov.seed,
                "timings_ms": {k: int(v * 1000) for k, v in timings.items()}}

    def _run_engine(self, task: str, source: AssembledVolume, params: dict[str, Any],
                    seed: int, model: str | None) -> TaskResult:
        """The engine on the source volume; a 2D multi-slice MR with non-contiguous positions
        (``source.runs``) one evenly spaced run at a time (the 2.5D context never spans a
        gap), the outputs joined back in slice order."""
        assert self.runner is not None
        vol = source.volume
        if not source.runs:
            return self.runner(task, vol, params, seed, model)
        parts = []
        for a, b in source.runs:
            fov = vol.fov[a:b] if vol.fov is not None else None
            parts.append(self.runner(task, Volume(vol.data[a:b], vol.spacing, vol.intensity,
                                                  fov=fov), params, seed, model))
        n = len(parts[0].outputs)
        if any(len(p.outputs) != n for p in parts):
            raise PermanentJobError("the engine gave a different number of outputs per run")
        outputs = []
        for k in range(n):
            outs = [p.outputs[k] for p in parts]
            fovs = [o.fov for o in outs]
            fov = (None if all(f is None for f in fovs) else np.concatenate(
                [f if f is not None else np.ones(o.data.shape, bool)
                 for f, o in zip(fovs, outs, strict=True)]))
            outputs.append(Volume(np.concatenate([o.data for o in outs]), outs[0].spacing,
                                  outs[0].intensity, fov=fov))
        prov = parts[0].provenance
        prov = replace(prov, seconds=sum(p.provenance.seconds for p in parts),
                       extra={**prov.extra, "slice_runs": [list(r) for r in source.runs]})
        logger.info("2D multi-slice MR: %d run(s) of slices processed one at a time",
                    len(source.runs))
        return TaskResult(outputs, prov)

    def _keep_held_slices(self, job: Job, k: int, source: Volume, out: Volume) -> None:
        """The middle slices of a held output and its input, for the console's picture
        (:mod:`node.pipeline.preview`); a failure costs the picture, never the hold."""
        if self.held_dir is None:
            return
        try:
            save_held_slices(self.held_dir, job.id, k, source, out)
        except OSError as exc:
            logger.warning("could not keep the slices of held output %d of job %s: %s",
                           k, job.id, exc)

    def _load_source(self, job: Job, insts: Sequence[IndexedInstance]
                     ) -> tuple[AssembledVolume, list[dict[str, str]]]:
        """The series' volume, without the objects that are not part of it (each left out
        with a ledger entry: localizers, secondary captures, dose reports, burned-in
        annotation)."""
        datasets = []
        left_out = []
        for inst in insts:
            ds = self._read(inst.file_path)
            why = leave_out_reason(ds)
            if why is None:
                datasets.append(ds)
                continue
            left_out.append({"sop_uid": inst.sop_instance_uid, "reason": why})
            self._left_out(job.study_uid or "", job.series_uid or "", inst.sop_instance_uid,
                           why, {"job_id": job.id})
        if not datasets:
            raise PermanentJobError("no image of the series is part of a volume: "
                                    + "; ".join(sorted({x["reason"] for x in left_out})))
        try:
            source = assemble(datasets, slice_runs=True)
        except VolumeError as exc:
            if exc.reason not in SPLITTABLE:
                raise PermanentJobError(f"volume assembly: {exc}") from exc
            # a few objects of another size / orientation / frame of reference in the series
            # (a reformat, a second reconstruction): the largest regular stack is the volume,
            # every other object is left out with its reason
            stacks, rejected = assemble_split(datasets)
            if not stacks:
                raise PermanentJobError(f"volume assembly: {exc}") from exc
            source = max(stacks, key=lambda v: v.volume.data.shape[0])
            kept = {r.sop_instance_uid for r in source.geometry.sources}
            own = {u: f"{r.reason.value}: {r.message}" for r in rejected
                   for u in r.sop_instance_uids}
            for ds in datasets:
                uid = str(ds.SOPInstanceUID)
                if uid not in kept:
                    why = own.get(uid) or f"not part of the series' largest regular stack ({exc})"
                    left_out.append({"sop_uid": uid, "reason": why})
                    self._left_out(job.study_uid or "", job.series_uid or "", uid, why,
                                   {"job_id": job.id})
        return source, left_out

    def _complete_outputs(self, job: Job,
                          built: list[tuple[str, Event, str | None]]) -> list[str]:
        """One transaction: every output series of this attempt ``building`` -> ``complete``
        with its ``output.created`` entry (and ``output.held`` naming why for one refused
        dispatch), the replace policy's supersede mark and the dispatch jobs. Before it
        commits, a crash leaves only partial (building) series."""
        made = [uid for uid, _, _ in built]
        with self.parts.engine.begin() as conn:
            # only while this attempt's claim is current (not cancelled, lease not lost to
            # another worker): the conditional UPDATE also locks the job row until commit
            if not self.jobs.heartbeat(job.id, claim=job, conn=conn):
                raise JobClaimLost(f"job {job.id} was cancelled or claimed again while attempt "
                                   f"{job.attempts} built its outputs: they are not released")
            for series_uid, event, refusal in built:
                res = conn.execute(update(outputs).where(and_(
                    outputs.c.series_uid == series_uid, outputs.c.state == OUTPUT_BUILDING,
                )).values(state=OUTPUT_COMPLETE, created_at=_now()))
                if res.rowcount != 1:
                    raise RuntimeError(f"output series {series_uid} was discarded while this "
                                       "attempt built it (the job was claimed again)")
                self.parts.ledger.append(event, conn=conn)
                if refusal is not None:
                    self.parts.ledger.append(Event(
                        type=EventType.OUTPUT_HELD, actor=ACTOR, outcome=Outcome.MINOR_FAILURE,
                        subject={"job_id": job.id, "study_uid": job.study_uid,
                                 "series_uid": series_uid},
                        payload={"source_series_uids": [job.series_uid],
                                 "reasons": [refusal], "checks": ["watermark_unverified"],
                                 "dispatch": "refused"}), conn=conn)
            if job.engine_spec.replace and made:
                self._supersede(job, made, conn)
            self._queue_dispatch(job, made, conn=conn)
        return made

    def _queue_dispatch(self, job: Job, made: list[str], conn: Connection | None = None) -> None:
        """One dispatch job per (output series, destination), never two."""
        if conn is None:
            with self.parts.engine.begin() as c:
                self._queue_dispatch(job, made, conn=c)
            if made:
                self.pool.wake()
            return
        existing = {(j.series_uid, j.dispatch_spec.destination)
                    for j in self.jobs.find(parent_id=job.id, conn=conn)}
        held = ({r[0] for r in conn.execute(select(outputs.c.series_uid).where(and_(
            outputs.c.series_uid.in_(made), outputs.c.held.is_(True))))} if made else set())
        for series_uid in made:
            if series_uid in held:  # refused (mark not verified) or held: never dispatched
                continue
            for dest in job.engine_spec.destinations:
                if (series_uid, dest) in existing:
                    continue
                d = self._destination(dest)
                self.jobs.enqueue(
                    JobKind.DISPATCH, study_uid=job.study_uid, series_uid=series_uid,
                    rule=job.rule, task=job.task, spec=DispatchJobSpec(destination=dest),
                    max_attempts=d.max_attempts, parent_id=job.id, generation=job.generation,
                    conn=conn,
                )

    def discard_partial_outputs(self, *, job_id: str | None = None,
                                reason: str = "") -> list[str]:
        """Remove output series still ``building``: the partial output of an attempt that
        died (or failed) between storing its first instance and completing the series.

        ``job_id`` None = every such series whose job is not running (start-up sweep: a
        running job's attempt may still be building).
        Each series goes through storage's own delete path (index rows in one transaction
        with the outputs row and an ``output.discarded`` ledger entry naming the removed
        instances and why; files after the commit). Returns the discarded series UIDs.
        """
        q = select(outputs.c.series_uid).where(outputs.c.state == OUTPUT_BUILDING)
        if job_id is not None:
            q = q.where(outputs.c.job_id == job_id)
        else:
            running = [j.id for j in self.jobs.find(states=(JobState.RUNNING,))]
            q = q.where(outputs.c.job_id.not_in(running))
        with self.parts.engine.connect() as c:
            uids = [r[0] for r in c.execute(q)]
        reason = reason or "partial output of an attempt that died"
        return [uid for uid in uids if self._discard_output(uid, reason)]

    def _discard_output(self, series_uid: str, reason: str, *,
                        orphans_of: Job | None = None, held_by: str | None = None) -> bool:
        """Remove one ``building`` output series. ``orphans_of`` (the job whose attempt
        built it): also instances of the series when its row is already gone (an attempt
        that lost its claim kept storing into a series the next attempt had discarded).
        A ``complete`` series is never touched, except a held one that an administrator
        discards (``held_by``: the actor, ``user:<name>``)."""
        insts = self.parts.index.instances(series_instance_uid=series_uid)
        with self.parts.engine.begin() as conn:
            row = conn.execute(select(outputs).where(outputs.c.series_uid == series_uid)).first()
            if row is None:
                if orphans_of is None or not insts:
                    return False
            elif held_by is None and row.state != OUTPUT_BUILDING:
                return False
            elif held_by is not None and not row.held:
                return False  # an administrator removes held outputs only
            else:
                wanted = (outputs.c.held.is_(True) if held_by is not None
                          else outputs.c.state == OUTPUT_BUILDING)
                res = conn.execute(outputs.delete().where(and_(
                    outputs.c.series_uid == series_uid, wanted)))
                if res.rowcount != 1:
                    return False  # completed or discarded by someone else meanwhile
            self.parts.index.delete_instances(conn, [i.pk for i in insts])
            if row is not None:
                job_id, study_uid, source = row.job_id, row.study_uid, row.source_series_uid
                attempt, planned = row.attempt, row.instances
            else:
                assert orphans_of is not None
                job_id, study_uid = orphans_of.id, orphans_of.study_uid
                source, attempt, planned = orphans_of.series_uid, orphans_of.attempts, None
            self.parts.ledger.append(Event(
                type=EventType.OUTPUT_DISCARDED, actor=held_by or ACTOR,
                outcome=Outcome.SUCCESS if held_by else Outcome.MINOR_FAILURE,
                subject={"job_id": job_id, "study_uid": study_uid, "series_uid": series_uid},
                payload={"source_series_uids": [source],
                         "sop_uids": [i.sop_instance_uid for i in insts],
                         "sha256": [i.sha256 for i in insts],
                         "attempt": attempt, "planned_instances": planned, "reason": reason},
            ), conn=conn)
        for i in insts:  # after the commit; a crash here leaves unreferenced files that
            try:         # start-up recovery removes
                self.parts.store.delete(i.file_path)
            except Exception:
                logger.exception("could not remove discarded file %s", i.file_path)
        logger.warning("discarded partial output series %s (%d instance(s)): %s",
                       series_uid, len(insts), reason)
        return True

    def _destination(self, name: str) -> Destination:
        for d in self.settings.destinations:
            if d.name == name:
                return d
        raise PermanentJobError(f"unknown destination {name!r}")

    def _marker(self, series_uid: str, out: Volume, output_format: codes.OutputFormat,
                timings: dict[str, float],
                verified: dict[str, Any]) -> tuple[Callable[[Any], Any] | None, str | None]:
        """The watermark embedder for one output series and its payload (hex); ``verified``
        receives the bound used and whether every unit's mark was detected. (None, None)
        when the node marks nothing."""
        if self.mark_key is None:
            return None, None
        from audit.watermark import CURRENT_FORMAT, embed_verified, make_payload
        from audit.watermark import payload_hex as phex
        from audit.watermark.fidelity import measure
        from audit.watermark.fingerprint import volume_fingerprints
        from engine.api import Intensity
        from node.dicom.volume import stored_scale

        payload = make_payload(self.mark_key.key_id, mark_id_for(series_uid))
        key = self.mark_key
        hu = out.intensity is Intensity.HU
        bound = self.fidelity
        data = np.asarray(out.data)
        slope, intercept = stored_scale(float(data.min()), float(data.max()), out.intensity)

        def mark(a: Any) -> Any:
            # checked as dispatch will check it: each single-frame instance on its own,
            # a multi-frame instance on its pooled sample of frames
            t = time.perf_counter()
            try:
                n = a.shape[0]
                units = ([[z] for z in range(n)] if output_format is codes.OutputFormat.SC
                         else [list(range(n))])
                peak = float((1 << 16) - 1)  # PSNR at the stored bit depth (Bits Stored 16)
                delta, ceiling = bound.limits(a, hu=hu, slope=slope, peak=peak)
                marked, report = embed_verified(
                    a, key, payload, units=units, bits_stored=16, signed=False,
                    max_delta=delta, ceiling=ceiling, detect_keys=self.detect_keys or None,
                    fmt=CURRENT_FORMAT)
                undetected = report.detected.count(False)
                if out.fov is not None and not out.fov.all():
                    # padding / out-of-FOV pixels keep the input's values (no mark there);
                    # the mark is checked again on what is actually stored
                    marked = np.where(out.fov, marked, a).astype(a.dtype, copy=False)
                    undetected = sum(not self._unit_marked(marked, u, payload) for u in units)
                    verified["watermark_fov_only"] = True
                verified.update(watermark_max_delta=max(report.max_delta),
                                watermark_verified=undetected == 0,
                                watermark_units=len(units),
                                watermark_undetected=undetected,
                                watermark_format=report.format_version,
                                watermark_bound=bound.record(hu=hu),
                                watermark_fidelity=measure(a, marked, slope=slope, hu=hu,
                                                           peak=peak),
                                # perceptual hashes of every marked slice: identification
                                # when a leaked rendering has lost the mark
                                fingerprints=volume_fingerprints(
                                    marked, hu=hu, slope=slope, intercept=intercept))
                if report.raised:
                    logger.info("watermark of %s: bound raised from %d to %d in %d of %d "
                                "unit(s) (below the image noise) to make it detectable",
                                series_uid, delta, max(report.max_delta), report.raised,
                                len(units))
                if undetected:
                    logger.warning(
                        "watermark of %s not detectable in %d of %d unit(s) within the "
                        "fidelity bound (up to %d stored units): the output is not dispatched",
                        series_uid, undetected, len(units),
                        max(report.limit))
                return marked
            finally:
                timings["watermark"] = timings.get("watermark", 0.0) + time.perf_counter() - t

        return mark, phex(payload)

    def _unit_marked(self, marked: Any, unit: list[int], payload: int) -> bool:
        """Whether a receiver finds the mark in one unit (as ``embed_verified`` checks it)."""
        from audit.watermark import detect
        from audit.watermark.core import VERIFY_MAX_FRAMES, sample_frames

        host = marked[np.asarray(unit, dtype=np.int64)]
        probe = sample_frames(len(unit), VERIFY_MAX_FRAMES)
        det = detect(host[probe] if len(unit) > 1 else host[0], self.detect_keys)
        return bool(det.marked and det.payload == payload)

    def _build_and_store(self, job: Job, source: AssembledVolume, out: Volume, prov: Provenance,
                         k: int, stats: dict[str, str], timings: dict[str, float],
                         started: list[str]) -> tuple[str, Event, str | None]:
        """Build one output series, record it as ``building``, store its instances.
        Returns the series UID, its ``output.created`` event (appended on completion) and,
        when the node marked it but could not verify the mark, why it is refused dispatch
        (the series is stored and recorded, flagged held, and never dispatched)."""
        seed_text = output_uid_seed(job, prov, k)
        series_uid = output_series_uid(seed_text)
        output_format = codes.OutputFormat(job.engine_spec.output_format)
        verified: dict[str, Any] = {}
        mark, payload_hex = self._marker(series_uid, out, output_format, timings, verified)
        wm_before = timings.get("watermark", 0.0)
        t0 = time.perf_counter()
        n_out = self.settings.output_series_number_base + job.engine_spec.task_index * 10 + k + 1
        spec = SeriesSpec(
            output_format, prov, ledger_entry=f"job:{job.id}",
            series_number=n_out, series_instance_uid=series_uid, uid_seed=seed_text,
        )
        built = build_series(source, out, spec, mark=mark)
        refusal = None
        if verified.get("watermark_verified") is False:
            refusal = (f"watermark not detectable in {verified.get('watermark_undetected')} of "
                       f"{verified.get('watermark_units')} unit(s) within the fidelity bound (up "
                       f"to {verified.get('watermark_max_delta')} stored units): an output "
                       "whose mark the node cannot verify is never dispatched")
        wm = timings.get("watermark", 0.0) - wm_before
        timings["build"] = timings.get("build", 0.0) + time.perf_counter() - t0 - wm
        # the plan first: a crash while storing leaves a row that names the partial series
        with self.parts.engine.begin() as conn:
            conn.execute(outputs.insert().values(
                series_uid=series_uid, job_id=job.id, study_uid=job.study_uid,
                source_series_uid=job.series_uid, generation=job.generation,
                output_format=built.output_format.value, instances=len(built.datasets),
                watermark_payload=payload_hex, digest=None, held=refusal is not None,
                superseded=False,
                state=OUTPUT_BUILDING, attempt=job.attempts, created_at=_now(),
            ))
        started.append(series_uid)
        t0 = time.perf_counter()
        sop_uids, digests = [], []
        for ds in built.datasets:
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            stored = self.parts.ingest(buf.getvalue())
            sop_uids.append(str(ds.SOPInstanceUID))
            digests.append(stored.record.sha256)
        timings["store"] = timings.get("store", 0.0) + time.perf_counter() - t0
        digest = "sha256:" + hashlib.sha256("".join(digests).encode()).hexdigest()
        with self.parts.engine.begin() as conn:
            conn.execute(update(outputs).where(outputs.c.series_uid == series_uid)
                         .values(digest=digest, instances=len(sop_uids)))
        event = Event(
            type=EventType.OUTPUT_CREATED, actor=ACTOR,
            subject={"job_id": job.id, "study_uid": job.study_uid, "series_uid": series_uid,
                     "model_id": prov.model_id},
            payload={"source_series_uids": [job.series_uid], "output_series_uid": series_uid,
                     "output_sop_uids": sop_uids, "sha256": digests,
                     "watermark_payload": payload_hex, **verified,
                     "output_format": built.output_format.value,
                     "model_id": prov.model_id, "model_version": prov.model_version,
                     "weights_sha256": prov.weights_sha256, "seed": prov.seed,
                     "quality": stats,
                     **({"quality_released_by": job.engine_spec.released_by,
                         "quality_release_reason": job.engine_spec.release_reason}
                        if job.engine_spec.released_by else {})},
        )
        return series_uid, event, refusal

    def _supersede(self, job: Job, made: list[str], conn: Connection) -> None:
        earlier = [j.id for j in self.jobs.find(kind=JobKind.ENGINE, series_uid=job.series_uid,
                                                rule=job.rule, task=job.task, conn=conn)
                   if j.id != job.id]
        conn.execute(update(outputs).where(and_(
            outputs.c.job_id.in_(earlier), outputs.c.series_uid.not_in(made),
        )).values(superseded=True))

    # -- the administrator's view of a study, and re-routing it ----------------------------
    def reprocess(self, study_uid: str, *, by: str, reason: str) -> list[str]:
        """Route a stored study again with the current rules and models (``synthnode study
        reprocess``): a new engine job per matching rule and task, also where the same
        source was processed before. Recorded in the ledger (``study.reopened``, actor
        ``user:<by>``, payload reprocess, reason, the queued jobs). Returns the job ids."""
        status = self.tracker.status(study_uid)
        if status is None and not self.parts.index.instances(study_instance_uid=study_uid):
            raise ValueError(f"unknown study {study_uid}")
        generation = status.generation if status else 0
        queued = self.on_study_complete(study_uid, generation, force=True)
        self.parts.ledger.append(Event(
            type=EventType.STUDY_REOPENED, actor=f"user:{by}", outcome=Outcome.SUCCESS,
            subject={"study_uid": study_uid},
            payload={"reprocess": True, "reason": reason, "jobs": queued}))
        return queued

    def study_report(self, study_uid: str) -> dict[str, Any]:
        """Everything an administrator asks about one study (``synthnode study show``):
        completion, series received (with the rule that routes each now), engine jobs with
        their outcome, outputs and, per destination, delivered / queued / held / refused /
        failed and why."""
        status = self.tracker.status(study_uid)
        insts = self.parts.index.instances(study_instance_uid=study_uid)
        if status is None and not insts:
            raise ValueError(f"unknown study {study_uid}")
        with self.parts.engine.connect() as c:
            out_rows = {r.series_uid: r for r in c.execute(
                select(outputs).where(outputs.c.study_uid == study_uid))}
        by_series: dict[str, list[IndexedInstance]] = {}
        for i in insts:
            if i.series_instance_uid not in out_rows:
                by_series.setdefault(i.series_instance_uid, []).append(i)
        series = []
        for uid, group in sorted(by_series.items()):
            head = self._read(group[0].file_path, headers_only=True)
            facts = SeriesFacts(head, len(group), status.called_ae if status else None,
                                status.calling_ae if status else None, is_synthetic(head),
                                False)
            routing = route(self.settings, facts)
            series.append({"series_uid": uid, "instances": len(group),
                           "modality": str(head.get("Modality", "")),
                           "description": str(head.get("SeriesDescription", "")),
                           "rule": routing.rule.name if routing.rule else None,
                           "held": hold_reason(routing.rule) if routing.rule else None,
                           "not_routed": None if routing.rule else (routing.skipped
                                                                    or "no rule matched")})
        all_jobs = self.jobs.list(study_uid=study_uid, limit=10000)
        dispatch = [j for j in all_jobs if j.kind is JobKind.DISPATCH]
        engine_jobs = []
        for j in sorted((j for j in all_jobs if j.kind is JobKind.ENGINE),
                        key=lambda j: j.created_at):
            r = j.result or {}
            outs = []
            for uid in r.get("outputs") or []:
                row = out_rows.get(uid)
                dests = {d: {"state": "not queued"} for d in j.engine_spec.destinations}
                for dj in dispatch:
                    if dj.series_uid == uid:
                        dests[dj.dispatch_spec.destination] = {
                            "state": _dispatch_state(dj), "job_id": dj.id,
                            **({"why": dj.error} if dj.error else {})}
                if row is not None and row.held:
                    dests = {d: {"state": "refused", "why": "watermark not verified"}
                             for d in j.engine_spec.destinations}
                outs.append({"series_uid": uid,
                             "instances": row.instances if row is not None else None,
                             "superseded": bool(row.superseded) if row is not None else None,
                             "destinations": dests})
            engine_jobs.append({
                "job_id": j.id, "series_uid": j.series_uid, "rule": j.rule, "task": j.task,
                "state": j.state.value, "outcome": r.get("outcome"), "error": j.error,
                "held": r.get("held") or [], "refused": r.get("refused") or [],
                "decision": r.get("decision"), "outputs": outs})
        originals = [{"series_uid": dj.series_uid, "destination": dj.dispatch_spec.destination,
                      "state": _dispatch_state(dj), **({"why": dj.error} if dj.error else {})}
                     for dj in dispatch if dj.dispatch_spec.original]
        return {"study_uid": study_uid,
                "state": status.state if status else "unknown",
                "generation": status.generation if status else None,
                "instances": len(insts) - sum(int(r.instances or 0) for r in out_rows.values()),
                "completed_at": str(status.completed_at) if status and status.completed_at
                else None,
                "series": series, "jobs": engine_jobs, "forwarded_originals": originals}

    # -- administrator decisions on held / refused outputs ------------------------------------
    def _decidable(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job.kind is not JobKind.ENGINE or job.state is not JobState.SUCCEEDED:
            raise ValueError(f"job {job.id} is a {job.state.value} {job.kind.value} job: only a "
                             "succeeded engine job with held or refused outputs is decided")
        result = job.result or {}
        if not (result.get("held") or result.get("refused")):
            raise ValueError(f"job {job.id} has no held or refused output "
                             f"(outcome {result.get('outcome', 'passed')})")
        if result.get("decision"):
            d = result["decision"]
            raise ValueError(f"job {job.id} was already {d.get('action')} by {d.get('by')}: "
                             f"{d.get('reason')}")
        return job

    def release(self, job_id: str, *, by: str, reason: str,
                via: dict[str, str] | None = None) -> str:
        """An administrator releases the quality-held outputs of an engine job: a new engine
        job (same source, parameters and seed, so the same output) runs the gate, records
        its findings and builds them anyway; its outputs are dispatched like any other. An
        output refused for an unverified watermark cannot be released (discard it). Recorded
        in the ledger (``output.released``, actor ``user:<by>``, the reason, and ``via``: where
        the decision came from, e.g. the console and its client's address). Returns the new
        job's id."""
        job = self._decidable(job_id)
        result = job.result or {}
        if result.get("refused"):
            raise ValueError(f"job {job.id} has output(s) whose watermark could not be verified: "
                             "such an output is never dispatched; discard it (jobs discard)")
        if not reason.strip():
            raise ValueError("a release needs a reason")
        spec = job.engine_spec.model_copy(update={
            "released_from": job.id, "released_by": by, "release_reason": reason})
        with self.parts.engine.begin() as conn:
            new_id = self.jobs.enqueue(
                JobKind.ENGINE, study_uid=job.study_uid, series_uid=job.series_uid,
                rule=job.rule, task=job.task, spec=spec, seed=job.seed,
                max_attempts=self.settings.job_max_attempts, generation=job.generation,
                conn=conn)
            self.parts.ledger.append(Event(
                type=EventType.OUTPUT_RELEASED, actor=_decider(by), outcome=Outcome.SUCCESS,
                subject={"job_id": job.id, "study_uid": job.study_uid},
                payload={**(via or {}), "source_series_uids": [job.series_uid],
                         "reason": reason, "new_job_id": new_id,
                         "checks": sorted({c for h in result.get("held") or []
                                           for c in h.get("checks") or []})}), conn=conn)
            self.jobs.annotate(job.id, "decision", {
                "action": "released", "by": by, "reason": reason, "at": _now().isoformat(),
                "job_id": new_id}, conn=conn)
        self._forget_held_slices(job.id)
        self.pool.wake()
        return new_id

    def discard(self, job_id: str, *, by: str, reason: str,
                via: dict[str, str] | None = None) -> list[str]:
        """An administrator discards the held and refused outputs of an engine job: a
        refused output series stored in the node is removed through storage's delete path;
        a quality-held output (never built) is closed. Recorded in the ledger
        (``output.discarded``, actor ``user:<by>``, the reason, ``via`` as for
        :meth:`release`). Returns the removed series."""
        job = self._decidable(job_id)
        if not reason.strip():
            raise ValueError("a discard needs a reason")
        result = job.result or {}
        removed = [r["series_uid"] for r in result.get("refused") or []
                   if self._discard_output(r["series_uid"], reason, held_by=_decider(by))]
        with self.parts.engine.begin() as conn:
            if result.get("held"):
                self.parts.ledger.append(Event(
                    type=EventType.OUTPUT_DISCARDED, actor=_decider(by),
                    outcome=Outcome.SUCCESS,
                    subject={"job_id": job.id, "study_uid": job.study_uid},
                    payload={**(via or {}), "source_series_uids": [job.series_uid],
                             "reason": reason,
                             "held_outputs": [h.get("index") for h in result["held"]]}),
                    conn=conn)
            self.jobs.annotate(job.id, "decision", {
                "action": "discarded", "by": by, "reason": reason, "at": _now().isoformat(),
                "removed": removed}, conn=conn)
        self._forget_held_slices(job.id)
        return removed

    def _held_retention_loop(self) -> None:
        while True:
            try:
                self.expire_held_pictures()
            except Exception:  # a full disk or a database hiccup: try again next time
                logger.exception("could not expire the pictures of held outputs")
            if self._retention_stop.wait(HELD_RETENTION_CHECK_S):
                return

    def expire_held_pictures(self, now: float | None = None) -> dict[str, int]:
        """Remove the kept slices of held outputs that no one released or discarded within
        the retention period (``storage.retention_days``; patient pixel data are not kept
        longer than the instances they came from), each recorded in the ledger
        (``output.pictures_expired``); the held output itself stays waiting for a decision,
        without its picture. Returns ``{job id: files removed}``."""
        if self.held_retention_days is None or self.held_dir is None:
            return {}
        cutoff = (now if now is not None else time.time()) - self.held_retention_days * 86400
        removed = expire_held_slices(self.held_dir, cutoff)
        for job_id, files in removed.items():
            try:
                study = self.jobs.get(job_id).study_uid
            except KeyError:
                study = None
            self._event(EventType.OUTPUT_PICTURES_EXPIRED,
                        {"job_id": job_id, **({"study_uid": study} if study else {})},
                        {"files": files, "retention_days": self.held_retention_days,
                         "reason": "retention: no one released or discarded the held output "
                                   f"within {self.held_retention_days} day(s)"})
        return removed

    def _forget_held_slices(self, job_id: str) -> None:
        """The console's picture of a held output is patient pixel data kept only until the
        administrator decides (:func:`node.pipeline.preview.forget_held_slices`)."""
        if self.held_dir is None:
            return
        try:
            forget_held_slices(self.held_dir, job_id)
        except OSError as exc:
            logger.warning("could not remove the kept slices of job %s: %s", job_id, exc)

    # -- stage 4: dispatch job -----------------------------------------------------------------
    def run_dispatch_job(self, job: Job) -> dict[str, Any]:
        dest_name = job.dispatch_spec.destination
        dest = self._destination(dest_name)
        insts = self.parts.index.instances(series_instance_uid=job.series_uid)
        if not insts:
            raise PermanentJobError(f"output series {job.series_uid} has no instances")
        with self.parts.engine.connect() as c:
            acked = {r[0] for r in c.execute(select(dispatch_acks.c.sop_instance_uid).where(and_(
                dispatch_acks.c.job_id == job.id, dispatch_acks.c.destination == dest_name)))}
        todo = [i for i in insts if i.sop_instance_uid not in acked]
        datasets = [self._read(i.file_path) for i in todo]
        terminal = job.attempts >= job.max_attempts
        t0 = time.perf_counter()
        result = self.dispatcher.send(
            datasets, dest_name, job_id=job.id, already_acknowledged=acked,
            attempt=job.attempts, terminal=terminal,
        )
        if result.acknowledged:
            now = _now()
            with self.parts.engine.begin() as conn:
                for uid in result.acknowledged:
                    conn.execute(dispatch_acks.insert().values(
                        job_id=job.id, destination=dest_name, sop_instance_uid=uid,
                        acknowledged_at=now))
        if result.state is DispatchState.SUCCEEDED:
            return {"destination": dest_name, "acknowledged": len(acked) + len(result.acknowledged),
                    "timings_ms": {"send": int((time.perf_counter() - t0) * 1000)}}
        if result.state is DispatchState.REFUSED:
            raise PermanentJobError(f"refused by policy: {result.reason}")
        if any(not f.transient for f in result.failed.values()):
            raise PermanentJobError(f"dispatch failed: {result.reason}")
        raise TransientJobError(f"dispatch to {dest_name}: {result.reason}",
                                retry_after_s=self.dispatcher.backoff(dest, max(1, job.attempts)))


def _dispatch_state(job: Job) -> str:
    """A dispatch job as the administrator reads it: delivered, queued, sending, refused
    (destination policy) or failed."""
    if job.state is JobState.SUCCEEDED:
        return "delivered"
    if job.state is JobState.FAILED:
        return "refused" if (job.error or "").startswith("refused by policy") else "failed"
    return {"queued": "queued", "running": "sending"}.get(job.state.value, job.state.value)


def _decider(by: str) -> str:
    """The ledger actor of an administrator's decision: ``user:<by>`` for a person named on
    the command line, or ``by`` itself when it is already an actor (``token:NAME``: the
    console's signed-in token)."""
    return by if by.startswith("token:") else f"user:{by}"


def build_pipeline(ctx: NodeContext) -> Pipeline:
    """The production pipeline for a node context: gated engine runner on
    ``settings.models_dir`` with the configured approvers, outputs marked with the key in
    ``settings.watermark_key_file`` (generated on first start; older keys from
    ``watermark.extra_key_files`` are also recognised)."""
    from audit.modelgate import Approver, ModelGate
    from audit.watermark import WatermarkKey

    s = ctx.settings
    gate = ModelGate(ctx.ledger, Approver.from_config(s.audit.approvers))
    runner = GatedEngineRunner(gate, s.models_dir, options=s.engine, device=s.engine.device)
    if not s.watermark_key_file.exists():
        # First start: generate the site's secret marking key (mode 0600, never overwritten),
        # as the ledger signing key is generated. Rotate with `synthnode watermark keygen`.
        WatermarkKey.generate(key_id=1).to_file(s.watermark_key_file)
        logger.info("generated watermark key %s (key id 1)", s.watermark_key_file)
    key = WatermarkKey.from_file(s.watermark_key_file)
    extra = [WatermarkKey.from_file(p) for p in s.watermark.extra_key_files if Path(p).exists()]
    detect_keys = ([key] if key else []) + extra
    return Pipeline.from_context(ctx, runner=runner, mark_key=key, detect_keys=detect_keys,
                                 fidelity=FidelityBound(
                                     hu_max_change=s.watermark.hu_max_change,
                                     other_max_delta=s.watermark.other_max_delta,
                                     min_psnr_db=s.watermark.min_psnr_db,
                                     other_noise_fraction=s.watermark.other_noise_fraction))
