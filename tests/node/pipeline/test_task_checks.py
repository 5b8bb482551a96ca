"""``config check`` and ``rules test`` check each rule's task against the engine's tasks and
the installed models, naming the key, its line and a suggestion."""
from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from node.cli import app
from tests.support.engine import tiny_model_dir


def config(tmp_path: Path, task: str, params: str, model: str = "") -> Path:
    models = tmp_path / "models"
    if not models.exists():
        models.mkdir()
        tiny_model_dir(models, "ct_denoise")
    f = tmp_path / "node.toml"
    f.write_text(
        'environment = "development"\n'
        f'data_dir = "{tmp_path / "data"}"\n'
        "[audit]\n"
        f'models_dir = "{models}"\n'
        "[pipeline]\n"
        "[[pipeline.rules]]\n"
        'name = "ct"\n'
        'match = { modality = "CT" }\n'
        f'tasks = [{{ task = "{task}", params = {params}{model} }}]\n')
    return f


def test_misspelt_task_and_parameter_are_named_with_a_suggestion(tmp_path: Path) -> None:
    f = config(tmp_path, "ct_denoize", "{ strenght = 0.3 }")
    r = CliRunner().invoke(app, ["config", "check", str(f)])
    assert r.exit_code == 2
    assert "unknown task 'ct_denoize'" in r.output and "did you mean 'ct_denoise'?" in r.output
    assert f"{f}:9" in r.output  # the line of the tasks key
    f = config(tmp_path, "ct_denoise", "{ strenght = 0.3, steps = 99 }")
    r = CliRunner().invoke(app, ["config", "check", str(f)])
    assert r.exit_code == 2
    assert "no parameter 'strenght'" in r.output and "did you mean 'strength'?" in r.output
    assert "steps" in r.output and "<= 8" in r.output


def test_task_without_installed_model_and_unknown_model(tmp_path: Path) -> None:
    f = config(tmp_path, "ct_to_mr", "{}")
    r = CliRunner().invoke(app, ["config", "check", str(f)])
    assert r.exit_code == 2 and "no model for task 'ct_to_mr'" in r.output
    f = config(tmp_path, "ct_denoise", "{}", ', model = "tiny-ct-denoize"')
    r = CliRunner().invoke(app, ["config", "check", str(f)])
    assert r.exit_code == 2 and "no model 'tiny-ct-denoize'" in r.output
    f = config(tmp_path, "ct_denoise", "{ strength = 0.3 }")
    r = CliRunner().invoke(app, ["config", "check", str(f)])
    assert r.exit_code == 0, r.output


def test_rules_test_reports_the_task_problem(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    f = config(tmp_path, "ct_denoize", "{}")
    r = CliRunner().invoke(app, ["rules", "test", get_testdata_file("CT_small.dcm"),
                                 "-c", str(f)])
    out = " ".join(r.output.split())  # the console wraps long lines
    assert "rule problem" in out and "did you mean 'ct_denoise'?" in out
