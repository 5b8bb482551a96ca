"""Pipeline latency: last instance of a CT study received -> last output acknowledged by PACS.

An N-slice CT study (16-bit, valid headers, HU through Rescale Intercept -1024) is ingested
into a node context (SQLite index, file store with fsync, ledger: the production path), the
study is completed explicitly (the quiet period is a configured wait, reported, not slept),
and the pipeline runs its engine job and dispatch job in this process against a real Orthanc
on loopback (C-STORE), quality gate on (default limits). Reported per task and output
format: the time from the last instance stored to the last output instance acknowledged, and
its breakdown from the jobs' own timings: wait (routing + time the engine and dispatch jobs
sat queued; the configured quiet period comes on top), load, engine, quality, build,
watermark, store, send.

Study content (``--content``):

* ``abdomen``  engine.research.phantoms abdomen (``size`` x ``size``, 2 mm slices) with simulated
               low dose (engine.research.degrade.low_dose_ct, 0.25 of full dose); rendered once per
               invocation and shared by all runs;
* ``simple``   the test factory's cylinder phantom (tests/support/factory.py).

Runners:

* ``gated``    the production pipeline (node.pipeline.orchestrator.build_pipeline): models admitted by the
               model gate from a copy of the bundled ``engine/weights`` folders, approved here
               with a throw-away approver key; one run per ``--tasks`` entry;
* ``nlm``      the non-local-means restoration baseline (engine.research.baselines), no model.

Usage (the command behind bench/results/pipeline.md)::

    nice -n 10 python bench/bench_pipeline.py --runner gated --tasks ct_denoise ct_to_mr:t2w \
        --slices 64 --size 512 --format sc enhanced --out bench/results/pipeline.md
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def nlm_runner(task, volume, params, seed, model):  # type: ignore[no-untyped-def]
    from engine.api import Provenance, TaskResult
    from engine.research.baselines import nlm_ct

    t0 = time.perf_counter()
    out = nlm_ct()(volume)
    prov = Provenance(task=task, model_id="baseline-nlm", model_version="1",
                      weights_sha256="0" * 64, parameters=params, seed=seed, device="cpu",
                      steps=1, seconds=time.perf_counter() - t0)
    return TaskResult([out], prov)


#: bundled model folder per task (the shipped defaults)
BUNDLED = {"ct_denoise": "ct-denoise-wreg", "ct_to_mr": "ct-to-mr-wreg", "mr_denoise": "mr-denoise-wreg"}
DOSE = 0.25


def parse_task(text: str) -> tuple[str, dict[str, Any]]:
    """``ct_to_mr:t2w`` -> ("ct_to_mr", {"target": "t2w"}); ``ct_denoise`` -> ("ct_denoise", {})."""
    task, _, target = text.partition(":")
    return task, ({"target": target} if target else {})


def study_content(kind: str, slices: int, size: int):  # type: ignore[no-untyped-def]
    """(HU stack or None, slice spacing mm, pixel spacing mm, seconds to render)."""
    if kind == "simple":
        return None, 2.5, (0.7, 0.8), 0.0
    from engine.research.degrade import low_dose_ct
    from engine.research.phantoms import make_sample

    t0 = time.perf_counter()
    sample = make_sample(seed=4242, size=size, n_slices=slices, kind="abdomen")
    low = low_dose_ct(sample.ct_hu, sample.spacing[1], DOSE, seed=11)
    return low, sample.spacing[0], sample.spacing[1:], time.perf_counter() - t0


def run_once(content: Any, task_text: str, fmt: str, runner_name: str, threads: int,
             workdir: Path) -> dict:
    from audit.modelgate import public_key_b64
    from audit.watermark import WatermarkKey
    from config.settings import load_settings
    from node.app import build_context
    from node.ingest.ingestor import Ingestor
    from node.pipeline.jobs import JobKind
    from node.pipeline.orchestrator import Pipeline, build_pipeline
    from tests.support.orthanc import OrthancServer
    from tests.support.factory import make_series

    hu, slice_mm, pixel_mm, slices, size = content
    task, params = parse_task(task_text)
    orthanc = OrthancServer(workdir / "orthanc", dicomweb=False)
    orthanc.start()
    pipe = None
    try:
        models = workdir / "models"
        models.mkdir()
        overrides: dict[str, Any] = {}
        approve = runner_name == "gated"
        if approve:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            key = Ed25519PrivateKey.generate()
            overrides["audit"] = {"models_dir": str(models), "approvers": [
                {"name": "bench", "public_key": public_key_b64(key.public_key())}]}
        settings = load_settings(None, environment="development", data_dir=str(workdir / "node"),
                                 engine={"device": "cpu", "threads": threads}, **overrides,
                                 pipeline={
            "quiet_period_s": 30,
            "destinations": [{"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet,
                              "host": "127.0.0.1", "port": orthanc.dicom_port,
                              "accepts_synthetic": True}],
            "rules": [{"name": "ct", "match": {"modality": "CT"},
                       "tasks": [{"task": task, "params": params, "output_format": fmt}],
                       "destinations": ["pacs"]}],
        })
        ctx = build_context(settings)
        if approve:
            from audit.ledger import Ledger
            from audit.modelgate import Approver, ModelGate

            d = models / BUNDLED[task]
            shutil.copytree(ROOT / "engine" / "weights" / BUNDLED[task], d)
            ModelGate(Ledger(ctx.engine), [Approver("bench", key.public_key())]).approve(d, key)
            pipe = build_pipeline(ctx)
        else:
            if task != "ct_denoise":
                raise SystemExit("--runner nlm only does ct_denoise")
            pipe = Pipeline.from_context(ctx, runner=nlm_runner, mark_key=WatermarkKey.generate(7))
        series = make_series(slices, rows=size, cols=size, hu=hu, spacing=slice_mm,
                             pixel_spacing=pixel_mm,
                             body_part="ABDOMEN" if hu is not None else "HEAD")
        ing = Ingestor(ctx)
        t_ingest = time.perf_counter()
        for ds in series:
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            ing.ingest_part10(buf.getvalue(), calling_ae="CT", called_ae="SYNTHNODE", source="dimse")
        t_last = time.perf_counter()
        cpu_last = time.process_time()
        study = str(series[0].StudyInstanceUID)
        pipe.complete_study(study, trigger="bench")
        t_routed = time.perf_counter()
        n = pipe.pool.drain()
        t_done = time.perf_counter()
        cpu_s = time.process_time() - cpu_last
        jobs = {j.kind: j for j in pipe.jobs.list(study_uid=study)}
        eng, disp = jobs[JobKind.ENGINE], jobs.get(JobKind.DISPATCH)
        if eng.result and eng.result.get("held"):
            raise RuntimeError(f"quality gate held the output: {eng.result['held']}")
        if disp is None or disp.state.value != "succeeded" or n != 2:
            raise RuntimeError(f"pipeline did not deliver: {eng.state} {eng.error} {disp}")
        acked = orthanc.statistics()["CountInstances"]
        t = dict(eng.result["timings_ms"])
        t["send"] = disp.result["timings_ms"]["send"]
        queued = [(j.started_at - j.created_at).total_seconds() for j in (eng, disp)
                  if j.started_at is not None]
        t["wait"] = int((t_routed - t_last) * 1000 + sum(queued) * 1000)
        return {"ingest_s": t_last - t_ingest, "total_s": t_done - t_last, "cpu_s": cpu_s, "ms": t,
                "orthanc_instances": acked, "quiet_period_s": settings.pipeline.quiet_period_s,
                "model": eng.result.get("model_id"), "weights": eng.result.get("weights_sha256")}
    finally:
        if pipe is not None:
            pipe.stop()
        orthanc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--format", nargs="+", default=["sc"], choices=["sc", "mf_word_sc", "enhanced"])
    ap.add_argument("--runner", default="gated", choices=["gated", "nlm"])
    ap.add_argument("--tasks", nargs="+", default=["ct_denoise", "ct_to_mr:t2w"],
                    help="TASK or TASK:TARGET (ct_to_mr:t2w)")
    ap.add_argument("--content", default="abdomen", choices=["abdomen", "simple"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    load_before = os.getloadavg()
    hu, slice_mm, pixel_mm, render_s = study_content(args.content, args.slices, args.size)
    content = (hu, slice_mm, pixel_mm, args.slices, args.size)
    rows = []
    for task in args.tasks:
        for fmt in args.format:
            for r in range(args.repeats):
                with tempfile.TemporaryDirectory() as d:
                    res = run_once(content, task, fmt, args.runner, args.threads, Path(d))
                rows.append((task, fmt, r, res))
                print(task, fmt, r, f"{res['total_s']:.1f} s", res["ms"], flush=True)
    load_after = os.getloadavg()
    keys = ["wait", "load", "engine", "quality", "build", "watermark", "store", "send"]
    cmd = (f"nice -n 10 python bench/bench_pipeline.py --runner {args.runner} --tasks {' '.join(args.tasks)} "
           f"--slices {args.slices} --size {args.size} --format {' '.join(args.format)} "
           f"--content {args.content} --threads {args.threads} --repeats {args.repeats}")
    models = sorted({f"`{res['model']}` (weights sha256 {str(res['weights'])[:12]}...)" for *_, res in rows})
    lines = [
        "# Pipeline latency (bench/bench_pipeline.py)",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), Python {platform.python_version()}; "
        "Orthanc on loopback (C-STORE); node context with SQLite (WAL), fsync'd file store, ledger; "
        f"engine on CPU, torch threads {args.threads or 'all cores'}; quality gate on (default limits). "
        f"Load average (1/5/15 min) at start {'/'.join(f'{x:.1f}' for x in load_before)}, at end "
        f"{'/'.join(f'{x:.1f}' for x in load_after)} (other jobs share the cores).",
        f"Study: {args.slices} slices {args.size}x{args.size} CT, content `{args.content}`"
        + (f" (engine.research.phantoms abdomen, low dose {DOSE} of full dose; rendered once in {render_s:.0f} s, "
           "not part of the metric)" if args.content == "abdomen" else "")
        + f"; runner `{args.runner}`, models: {', '.join(models)}.",
        "",
        "Time from the last instance stored to the last output instance acknowledged by Orthanc. "
        "wait = routing + time the engine and dispatch jobs sat queued; the quiet period (a "
        "configured wait) comes on top and has its own column. CPU = CPU seconds this process "
        "used over the same span (all threads; Orthanc's own CPU not included): on an otherwise "
        "idle 2-core machine the wall time would lie between CPU / 2 (all parallel) and CPU "
        "(all serial).",
        "",
        "| task | format | run | quiet period (s, configured) | total after last instance (s) | CPU (s) | "
        + " | ".join(f"{k} (s)" for k in keys) + " | instances acked |",
        "|---|---|---|---|---|---|" + "---|" * len(keys) + "---|",
    ]
    for task, fmt, r, res in rows:
        ms = res["ms"]
        lines.append(
            f"| {task} | {fmt} | {r + 1} | {res['quiet_period_s']:.0f} | {res['total_s']:.1f} | {res['cpu_s']:.1f} | "
            + " | ".join(f"{ms.get(k, 0) / 1000:.2f}" for k in keys)
            + f" | {res['orthanc_instances']} |"
        )
    lines += ["", "Ingest of the study itself (not part of the metric): "
              + ", ".join(f"{task} {fmt} run {r + 1}: {res['ingest_s']:.1f} s" for task, fmt, r, res in rows), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
