"""Real multi-slice series nobody here wrote, fetched pinned by ``scripts/fetch-realdata``
(part of ``scripts/setup --test``) into ``$SYNTHNODE_REALDATA`` (default ``.realdata/``,
ignored by git); package, version, path and licence in docs/realdata.md.

Tests that need a series call :func:`require`: it skips, naming the setup step, when the
series is not there (the fetch failed or was not run)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

__all__ = ["SERIES", "RealSeries", "available", "read", "realdata_dir", "require"]

ROOT = Path(__file__).resolve().parents[2]


def realdata_dir() -> Path:
    return Path(os.environ.get("SYNTHNODE_REALDATA") or ROOT / ".realdata")


@dataclass(frozen=True)
class RealSeries:
    name: str  # folder under the data dir
    source: str  # package==version it was fetched from
    n_images: int  # image slices (other objects, e.g. an RT Structure Set, not counted)
    description: str


SERIES = {s.name: s for s in (
    RealSeries("cbct-head", "pylinac==1.5.0 (PyPI sdist)", 64,
               "Varian OBI cone-beam CT of a head phantom, 64 x 512 px, 2.5 mm, implicit VR"),
    RealSeries("mr-skyra-gre", "mrbias==1.0.2 (PyPI sdist)", 256,
               "Siemens Skyra 3T 3D GRE of the ISMRM/NIST system phantom, 256 x 256 px, 1 mm"),
    RealSeries("mr-memprage", "dwv@0.19.2 (npm)", 6,
               "Siemens MEMPRAGE (human head), 6 sagittal 1 mm slices about 9 mm apart"),
)}


def available(name: str) -> bool:
    marker = realdata_dir() / name / ".done"
    return marker.is_file() and marker.read_text().strip() == SERIES[name].source.split()[0]


def require(name: str) -> Path:
    """The series' folder; skips the calling test when it was not fetched."""
    import pytest

    if not available(name):
        pytest.skip(f"real series {name!r} ({SERIES[name].source}) not in {realdata_dir()}: "
                    "run scripts/fetch-realdata (part of scripts/setup --test)")
    return realdata_dir() / name


def _position(ds: Dataset) -> float:
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    return float(np.dot(np.cross(iop[:3], iop[3:]),
                        [float(v) for v in ds.ImagePositionPatient]))


def read(name: str, start: int = 0, count: int | None = None, *,
         images_only: bool = True) -> list[Dataset]:
    """The series' image slices in slice order (along the normal), ``count`` of them from
    ``start``; with ``images_only=False`` the other objects of the folder follow them."""
    folder = realdata_dir() / name
    dss: list[Dataset] = [pydicom.dcmread(p) for p in sorted(folder.iterdir())
                          if p.name != ".done"]
    images = sorted((d for d in dss if "ImagePositionPatient" in d), key=_position)
    others = [d for d in dss if "ImagePositionPatient" not in d]
    sel = images[start:None if count is None else start + count]
    return sel if images_only else sel + others
