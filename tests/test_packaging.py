"""pyproject.toml: the console scripts are installed and run from any folder."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

SCRIPTS = {"toolkit-evaluate": "toolkit.evaluate:main", "toolkit-train-teacher": "train_teacher:cli",
           "toolkit-distill": "distill:cli", "toolkit-pipeline": "pipeline:cli"}


def test_console_scripts_are_declared_and_load():
    installed = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name in SCRIPTS}
    assert {name: ep.value for name, ep in installed.items()} == SCRIPTS
    for ep in installed.values():
        assert callable(ep.load())


@pytest.mark.parametrize("name", ["toolkit-train-teacher", "toolkit-distill", "toolkit-pipeline"])
def test_console_script_runs_outside_the_checkout(name, tmp_path):
    exe = Path(sys.executable).parent / name
    if not exe.is_file():
        pytest.skip(f"{exe} not installed (pip install -e . makes it)")
    shown = subprocess.run([str(exe), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and f"usage: {name}" in shown.stdout and "--data" in shown.stdout


@pytest.mark.parametrize("prog,command", [("distill.py", "python distill.py"), ("toolkit-distill", "toolkit-distill")])
def test_interrupt_names_the_command_the_user_ran(prog, command):
    from toolkit.cli import _resume_text
    assert _resume_text(["--epochs", "3"], "--resume", prog) == (
        f"continue from the last checkpoint with: {command} --epochs 3 --resume")


# ----------------------------------------------------------------------------------------
# setup.cfg: the tools' configuration, used by pytest and by the linter that ./test.sh runs
# ----------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def test_pytest_reads_its_settings_from_setup_cfg(request):
    assert Path(request.config.inipath) == ROOT / "setup.cfg"
    assert "slow" in request.config.getini("markers")[0]


def test_test_sh_lints_before_the_suite_and_stops_on_a_finding():
    lines = [line.strip() for line in (ROOT / "test.sh").read_text().splitlines()]
    assert "set -euo pipefail" in lines  # a failing flake8 ends the script with its exit code
    lint = lines.index("flake8 .")
    assert lint < next(i for i, line in enumerate(lines) if line.startswith("python -m pytest"))


def test_the_linter_fails_on_a_lint_error_with_the_projects_config(tmp_path):
    flake8 = Path(sys.executable).parent / "flake8"
    if not flake8.is_file():
        pytest.skip("flake8 is not installed (requirements-test.txt installs it)")
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nx = 1\n")  # F401: an unused import
    good = tmp_path / "good.py"
    good.write_text("x = " + "1 + " * 27 + "1\n")  # 115 characters: within the configured 120
    config = ["--config", str(ROOT / "setup.cfg")]
    found = subprocess.run([str(flake8), *config, str(bad)], capture_output=True, text=True, timeout=120)
    assert found.returncode == 1 and "F401" in found.stdout
    assert subprocess.run([str(flake8), *config, str(good)], capture_output=True, timeout=120).returncode == 0
