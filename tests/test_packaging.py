"""Packaging: the distribution lists every package, ships the migrations, and the node
refuses a foreign package that shadows one of its top-level names."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SYNTHNODE_CONFIG")}


def test_pyproject_lists_every_package_and_maps_the_migrations() -> None:
    from setuptools import find_packages

    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = set(find_packages(str(REPO), include=["node*", "engine*", "storage*", "audit*",
                                                    "config*"]))
    listed = set(tool["packages"])
    assert listed - {"node.migrations", "node.migrations.versions"} == on_disk
    assert tool["package-dir"] == {"node.migrations": "alembic"}


def test_node_refuses_a_foreign_config_package_earlier_on_the_path(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "config"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("value = 1\n")
    env = {**_clean_env(), "PYTHONPATH": f"{shadow.parent}{os.pathsep}{REPO}"}
    res = subprocess.run([sys.executable, "-c", "import node"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "top-level package 'config' is taken from" in res.stderr
    assert str(shadow) in res.stderr
    ok = subprocess.run([sys.executable, "-c", "import node"], cwd=tmp_path,
                        env={**_clean_env(), "PYTHONPATH": str(REPO)}, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.slow
def test_an_installed_wheel_migrates_without_the_source_tree(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(REPO)],
                   check=True, cwd=tmp_path, env=_clean_env(), timeout=600)
    wheel = next(dist.glob("synthnode-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                   check=True, cwd=tmp_path, env=_clean_env(), timeout=600)
    db = tmp_path / "index.db"
    res = subprocess.run(
        [str(py), "-c", "import sys; from node.db import migrations_dir, upgrade; "
         "print(migrations_dir()); upgrade(sys.argv[1])", f"sqlite:///{db}"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    used = Path(res.stdout.strip().splitlines()[-1])
    assert used.name == "migrations" and str(used).startswith(str(venv)), used
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
    assert {"instances", "ledger_entries", "pipeline_jobs"} <= tables, tables
