"""Secure defaults on disk and in the log: a private data folder (0700, files 0600), a
watermark key readable by others refused, URL passwords never in the startup log, Celery
workers without remote control."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file

from audit.watermark.key import WatermarkKey
from tests.support.dimse import scu_store


def test_data_folder_private(start_node: Any) -> None:
    node = start_node()
    assert scu_store(node.address, [Path(get_testdata_file("CT_small.dcm"))]) == [0]
    s = node.ctx.settings
    assert s.data_dir.stat().st_mode & 0o777 == 0o700
    (row,) = node.ctx.index.instances()
    files = [node.ctx.store.path(row.file_path), s.data_dir / "index.db", s.ledger_key_file]
    for f in files:
        assert f.is_file(), f
        assert f.stat().st_mode & 0o077 == 0, f"{f} is readable by group or others"


def test_open_data_folder_is_tightened(tmp_path: Path, start_node: Any) -> None:
    from node.app import private_data_dir

    d = tmp_path / "open"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    private_data_dir(d)
    assert d.stat().st_mode & 0o777 == 0o700


def test_watermark_key_readable_by_others_refused(tmp_path: Path) -> None:
    f = tmp_path / "wm.key"
    WatermarkKey.generate(key_id=1).to_file(f)
    assert WatermarkKey.from_file(f).key_id == 1
    f.chmod(0o644)
    with pytest.raises(ValueError, match="0600"):
        WatermarkKey.from_file(f)


@pytest.mark.postgres
def test_passwords_not_in_startup_log(start_node: Any, caplog: pytest.LogCaptureFixture,
                                      pg_url: str) -> None:
    url = re.sub(r"://([^:@/]+)@", r"://\1:hunter2-secret@", pg_url)  # trust auth ignores it
    assert "hunter2-secret" in url
    caplog.set_level(logging.INFO)
    node = start_node(database={"url": url},
                      pipeline={"broker_url": "amqp://guest:amqp-secret@127.0.0.1:5672//"})
    assert node is not None
    text = caplog.text
    assert "effective configuration" in text
    assert "hunter2-secret" not in text and "amqp-secret" not in text


def test_celery_remote_control_off() -> None:
    from node.pipeline.broker import make_celery

    app = make_celery("memory://")
    assert app.conf.worker_enable_remote_control is False


def test_warning_without_off_node_anchoring(start_node: Any,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="node.app")
    start_node()
    assert "NO OFF-NODE ANCHORING" in caplog.text
    caplog.clear()
    start_node(audit={"syslog_target": "udp://127.0.0.1:5514"})
    assert "NO OFF-NODE ANCHORING" not in caplog.text
