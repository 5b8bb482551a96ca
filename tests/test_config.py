"""Settings: the bundled default loads, bad keys are named with path and reason."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from config.settings import DEFAULT_CONFIG, ConfigFileError, check_config, load_settings, redacted
from node.cli import app


def test_default_config_is_valid() -> None:
    assert check_config(DEFAULT_CONFIG) == []
    s = load_settings(DEFAULT_CONFIG)
    assert s.dimse.ae_title == "SYNTHNODE" and s.dimse.port == 11112
    assert s.database_url.startswith("sqlite:///")


def test_bad_keys_are_named(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text('[dimse]\nport = 0\nae_title = "A\\\\B"\nbogus = 1\n[database]\nurl = "mysql://x"\n')
    paths = {e.path for e in check_config(f)}
    assert paths == {"dimse.port", "dimse.ae_title", "dimse.bogus", "database.url"}


def test_not_toml(tmp_path: Path) -> None:
    f = tmp_path / "x.toml"
    f.write_text("[dimse\n")
    (err,) = check_config(f)
    assert "TOML" in err.reason


def test_env_overrides_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNTHNODE_DIMSE__PORT", "10400")
    assert load_settings(DEFAULT_CONFIG).dimse.port == 10400


def test_accept_any_ae_only_in_development(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError):
        load_settings(None, dimse={"accept_any_calling_ae": True})
    s = load_settings(None, environment="development", dimse={"accept_any_calling_ae": True})
    assert s.dimse.accept_any_calling_ae


def test_secrets_redacted() -> None:
    s = load_settings(None, dicomweb={"tokens": [{"name": "pacs", "token": "s3cret", "scopes": ["read"]}]})
    assert "s3cret" not in str(redacted(s))


def test_cli_config_check(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[dimse]\nmax_associations = 0\n")
    r = CliRunner().invoke(app, ["config", "check", str(f)])
    assert r.exit_code == 2
    assert "dimse.max_associations" in r.output
    r = CliRunner().invoke(app, ["config", "check", str(DEFAULT_CONFIG)])
    assert r.exit_code == 0, r.output
