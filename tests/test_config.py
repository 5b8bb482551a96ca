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


BAD_SITE = """\
environment = "development"
[dimse]
ae_tittle = "NODE"

[[audit.approvers]]
name = "site-admin"
public_key = "x"

[[audit.approvers]]
name = "site-admin"
public_key = "y"

[[pipeline.destinations]]
name = "pacs"
kind = "dimse"
ae_title = "PACS"
host = "127.0.0.1"
port = 104

[[pipeline.rules]]
name = "ct"
match = { modality = "CT", rows = ">=abc" }
tasks = [{ task = "ct_denoise" }]
destinations = ["pacs"]

[[pipeline.rules]]
name = "mr"
match = { modalty = "MR" }
tasks = [{ task = "mr_denoise" }]
"""


def test_config_check_names_file_line_and_suggestion(tmp_path: Path) -> None:
    f = tmp_path / "site.toml"
    f.write_text(BAD_SITE)
    r = CliRunner().invoke(app, ["config", "check", str(f)])
    assert r.exit_code == 2
    # what the schema rejects, and the rules checked against what routing knows
    assert f"{f}:22: pipeline.rules.0.match.rows: rule 'ct': rows = '>=abc' is not a comparison" in r.output
    assert (f"{f}:28: pipeline.rules.1.match.modalty: rule 'mr': unknown match key 'modalty'"
            in r.output and "did you mean 'modality'?" in r.output)
    assert f"{f}:3: dimse.ae_tittle: unknown key (did you mean 'ae_title'?)" in r.output
    assert f"{f}:10: audit.approvers: approver name 'site-admin' is used by entries 0 and 1" in r.output


def test_config_check_missing_file_names_it(tmp_path: Path) -> None:
    f = tmp_path / "nope.toml"
    r = CliRunner().invoke(app, ["config", "check", str(f)])
    assert r.exit_code == 2 and f"{f}: no such file" in r.output and "<file>" not in r.output
    r = CliRunner().invoke(app, ["studies", "-c", str(f)])
    assert r.exit_code == 2 and f"{f}: no such file" in r.output


def test_no_config_keeps_data_out_of_the_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --config / SYNTHNODE_CONFIG the bundled defaults keep their data in the user's
    data folder (XDG), never beside the installed code."""
    from node.cli.common import settings_from

    monkeypatch.delenv("SYNTHNODE_CONFIG", raising=False)
    monkeypatch.delenv("SYNTHNODE_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    s = settings_from(None)
    assert s.data_dir == tmp_path / "xdg" / "synthnode"
    assert not s.data_dir.resolve().is_relative_to(DEFAULT_CONFIG.parent.parent)
    monkeypatch.setenv("SYNTHNODE_DATA_DIR", str(tmp_path / "mine"))
    assert settings_from(None).data_dir == tmp_path / "mine"


def test_effective_configuration_is_readable_text() -> None:
    from config.settings import effective_text

    s = load_settings(None, database={"url": "postgresql+psycopg://u:s3cret@db/x"},
                      dicomweb={"tokens": [{"name": "pacs", "token": "t0ken", "scopes": ["read"]}]})
    text = effective_text(s)
    assert "dimse.ae_title = \"SYNTHNODE\"" in text.splitlines()
    assert 'database.url = "postgresql+psycopg://u:***@db/x"' in text.splitlines()
    assert "s3cret" not in text and "t0ken" not in text


def test_watermark_fidelity_keys_validated(tmp_path: Path) -> None:
    """The watermark's fidelity bound: defaults (4 HU, 2 stored units, 50 dB, rise to 0.5 x noise)
    and out-of-range values refused with the key named."""
    from pydantic import ValidationError

    from config.sections.watermark import WatermarkSettings

    w = WatermarkSettings()
    assert (w.hu_max_change, w.other_max_delta, w.min_psnr_db, w.other_noise_fraction) == (
        4.0, 2, 50.0, 0.5)
    for bad in ({"hu_max_change": 0}, {"other_max_delta": 100}, {"min_psnr_db": 20},
                {"other_noise_fraction": 1.0}, {"max_delta": 2}):
        with pytest.raises(ValidationError) as e:
            WatermarkSettings(**bad)
        assert next(iter(bad)) in str(e.value)
