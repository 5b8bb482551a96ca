"""Pipeline latency: last instance of a CT study received -> last output acknowledged by PACS.

A generated N-slice CT study (phantom in HU, 16-bit, valid headers) is ingested into a
node context (SQLite index, file store with fsync, ledger: the production path), the study
is completed explicitly (the quiet period is a configured wait, reported, not slept), and
the pipeline runs its engine job and dispatch job in this process against a real Orthanc
on loopback (C-STORE). Reported per run: the time from the last instance stored to the
last output instance acknowledged, and its breakdown (routing, load, engine, quality,
build, watermark, store, send) from the jobs' own timings.

Runners:

* ``nlm``    the project's non-local-means restoration baseline (engine.baselines), a real
             Volume -> Volume method that needs no trained model;
* ``gated``  the production runner: models admitted by the model gate from
             ``--models-dir`` (needs approved models and ``--approver-pub``).

Usage (the command behind bench/results/pipeline.md)::

    nice -n 10 python bench/bench_pipeline.py --slices 64 --size 512 --format sc mf_word_sc \\
        --out bench/results/pipeline.md
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def nlm_runner(task, volume, params, seed, model):  # type: ignore[no-untyped-def]
    from engine.api import Provenance, TaskResult
    from engine.baselines import nlm_ct

    t0 = time.perf_counter()
    out = nlm_ct()(volume)
    prov = Provenance(task=task, model_id="baseline-nlm", model_version="1",
                      weights_sha256="0" * 64, parameters=params, seed=seed, device="cpu",
                      steps=1, seconds=time.perf_counter() - t0)
    return TaskResult([out], prov)


def run_once(slices: int, size: int, fmt: str, runner_name: str, workdir: Path) -> dict:
    from audit.watermark import WatermarkKey
    from config.settings import load_settings
    from node.app import build_context
    from node.ingest import Ingestor
    from node.jobs import JobKind
    from node.pipeline import Pipeline
    from tests.pipeline.conftest import OrthancServer
    from tests.pipeline.factory import make_series

    orthanc = OrthancServer(workdir / "orthanc", dicomweb=False)
    orthanc.start()
    try:
        settings = load_settings(None, environment="development", data_dir=str(workdir / "node"),
                                 pipeline={
            "quiet_period_s": 30,
            "destinations": [{"name": "pacs", "kind": "dimse", "ae_title": orthanc.aet,
                              "host": "127.0.0.1", "port": orthanc.dicom_port,
                              "accepts_synthetic": True}],
            "rules": [{"name": "ct", "match": {"modality": "CT"},
                       "tasks": [{"task": "ct_denoise", "output_format": fmt}],
                       "destinations": ["pacs"]}],
        })
        ctx = build_context(settings)
        if runner_name != "nlm":
            raise SystemExit("only --runner nlm is wired in this script version")
        pipe = Pipeline.from_context(ctx, runner=nlm_runner, mark_key=WatermarkKey.generate(7))
        series = make_series(slices, rows=size, cols=size)
        ing = Ingestor(ctx)
        t_ingest = time.perf_counter()
        for ds in series:
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            ing.ingest_part10(buf.getvalue(), calling_ae="CT", called_ae="SYNTHNODE", source="dimse")
        t_last = time.perf_counter()
        study = str(series[0].StudyInstanceUID)
        pipe.complete_study(study, trigger="bench")
        t_routed = time.perf_counter()
        n = pipe.pool.drain()
        t_done = time.perf_counter()
        jobs = {j.kind: j for j in pipe.jobs.list(study_uid=study)}
        eng, disp = jobs[JobKind.ENGINE], jobs.get(JobKind.DISPATCH)
        if disp is None or disp.state.value != "succeeded" or n != 2:
            raise RuntimeError(f"pipeline did not deliver: {eng.state} {eng.error} {disp}")
        acked = orthanc.statistics()["CountInstances"]
        pipe.stop()
        t = dict(eng.result["timings_ms"])
        t["send"] = disp.result["timings_ms"]["send"]
        t["routing"] = int((t_routed - t_last) * 1000)
        return {"ingest_s": t_last - t_ingest, "total_s": t_done - t_last, "ms": t,
                "orthanc_instances": acked, "quiet_period_s": settings.pipeline.quiet_period_s}
    finally:
        orthanc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--format", nargs="+", default=["sc"], choices=["sc", "mf_word_sc", "enhanced"])
    ap.add_argument("--runner", default="nlm", choices=["nlm"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    for fmt in args.format:
        for r in range(args.repeats):
            with tempfile.TemporaryDirectory() as d:
                res = run_once(args.slices, args.size, fmt, args.runner, Path(d))
            rows.append((fmt, r, res))
            print(fmt, r, f"{res['total_s']:.1f} s", res["ms"], flush=True)
    keys = ["routing", "load", "engine", "quality", "build", "watermark", "store", "send"]
    lines = [
        "# Pipeline latency (bench/bench_pipeline.py)",
        "",
        f"Command: `nice -n 10 python bench/bench_pipeline.py --slices {args.slices} --size {args.size} "
        f"--format {' '.join(args.format)} --repeats {args.repeats}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), Python {platform.python_version()}; "
        "Orthanc 1.10 on loopback (C-STORE); node context with SQLite (WAL), fsync'd file store, ledger.",
        f"Study: {args.slices} slices {args.size}x{args.size} CT (generated phantom), runner `{args.runner}` "
        "(non-local-means restoration baseline; no trained diffusion model was shipped when this ran).",
        "",
        "Time from the last instance stored to the last output instance acknowledged by Orthanc "
        "(the quiet period, a configured wait, comes on top: shown in its own column).",
        "",
        "| format | run | quiet period (s, configured) | total after last instance (s) | "
        + " | ".join(f"{k} (s)" for k in keys) + " | outputs acked |",
        "|---|---|---|---|" + "---|" * len(keys) + "---|",
    ]
    for fmt, r, res in rows:
        ms = res["ms"]
        lines.append(
            f"| {fmt} | {r + 1} | {res['quiet_period_s']:.0f} | {res['total_s']:.1f} | "
            + " | ".join(f"{ms.get(k, 0) / 1000:.2f}" for k in keys)
            + f" | {res['orthanc_instances']} |"
        )
    lines += ["", "Ingest of the study itself (not part of the metric): "
              + ", ".join(f"{fmt} run {r + 1}: {res['ingest_s']:.1f} s" for fmt, r, res in rows), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
