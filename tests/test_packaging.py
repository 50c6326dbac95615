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
