"""The held-output picture: input | output | difference of the middle slices the pipeline
keeps when the quality gate holds an output."""
from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.types import Intensity, Volume
from node.pipeline.preview import (
    comparison_png,
    forget_held_slices,
    held_slices_path,
    save_held_slices,
)


def _vol(data: np.ndarray, intensity: Intensity = Intensity.HU) -> Volume:
    return Volume(data.astype(np.float32), (1.0, 1.0, 1.0), intensity)


def _panels(png: bytes, w: int) -> list[np.ndarray]:
    img = np.asarray(Image.open(BytesIO(png)))
    assert img.shape[1] == 3 * w + 8
    return [img[:, x:x + w] for x in (0, w + 4, 2 * w + 8)]


def test_middle_slices_and_a_signed_difference(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    src = rng.normal(0, 100, (5, 32, 32))
    out = src.copy()
    out[2, :, 16:] += 300.0  # the middle slice's right half brighter in the output
    out[0] += 1000.0  # another slice: must not show
    path = save_held_slices(tmp_path, "ab12-cd", 0, _vol(src), _vol(out))
    assert path == held_slices_path(tmp_path, "ab12-cd", 0) and path.is_file()
    a, b, d = _panels(comparison_png(path), 32)
    assert not np.array_equal(a, b)
    assert d[:, :16].max() == d[:, :16].min() == 127  # no change: mid-grey
    assert d[:, 16:].min() >= 254  # brighter: white (float32 rounding aside)


def test_identical_slices_give_a_flat_difference(tmp_path: Path) -> None:
    src = np.random.default_rng(1).normal(0, 1, (3, 16, 24))
    path = save_held_slices(tmp_path, "j1", 2, _vol(src, Intensity.MR),
                            _vol(src, Intensity.MR))
    a, b, d = _panels(comparison_png(path), 24)
    assert np.array_equal(a, b) and (d == 127).all()


def test_a_job_id_is_not_a_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        held_slices_path(tmp_path, "../etc", 0)


def test_the_gate_keeps_the_slices_and_a_failure_to_keep_them_costs_only_the_picture(
        tmp_path: Path) -> None:
    from audit.watermark import WatermarkKey
    from tests.node.pipeline.test_outcomes import broken_runner, node, send
    from tests.support.factory import make_series

    ctx, pipe = node(tmp_path / "a", broken_runner, mark_key=WatermarkKey.generate(key_id=4))
    assert pipe.held_dir == ctx.settings.data_dir / "held"
    study = send(ctx, make_series(2, rows=64, cols=64))
    assert pipe.complete_study(study) and pipe.pool.drain() == 1
    (job,) = pipe.jobs.list()
    assert job.result["outcome"] == "held"
    assert held_slices_path(pipe.held_dir, job.id, 0).is_file()
    pipe.stop()

    ctx, pipe = node(tmp_path / "b", broken_runner, mark_key=WatermarkKey.generate(key_id=4))
    pipe.held_dir = tmp_path / "not-a-dir"
    pipe.held_dir.write_text("a file where the folder should be")
    study = send(ctx, make_series(2, rows=64, cols=64))
    assert pipe.complete_study(study) and pipe.pool.drain() == 1
    (job,) = pipe.jobs.list()
    assert job.state.value == "succeeded" and job.result["outcome"] == "held"
    pipe.stop()


def test_forget_removes_one_jobs_slices_only(tmp_path: Path) -> None:
    v = Volume(np.zeros((3, 8, 8), np.float32), (1.0, 1.0, 1.0), Intensity.HU)
    for job in ("job-a", "job-b"):
        for k in (0, 1):
            save_held_slices(tmp_path, job, k, v, v)
    assert forget_held_slices(tmp_path, "job-a") == 2
    assert not (tmp_path / "job-a").exists()
    assert held_slices_path(tmp_path, "job-b", 1).is_file()
    assert forget_held_slices(tmp_path, "job-a") == 0  # nothing left: no error
