"""Every command of the README runs as written on a fresh clone: each ``python``/``torchrun``
line of its bash blocks has flags and values its script accepts (parsed and checked exactly as
the script would, before any work: paths, ranges, choices, the recipe), and the ``./`` scripts
exist. The README stays short (<= 150 lines of at most 100 characters), says what the data
looks like, and names no issue numbers."""
from __future__ import annotations

import glob
import os
import re
import shlex
from pathlib import Path

import pytest

import distill
import pipeline
import train_teacher
from toolkit import evaluate
from toolkit.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIGS = {"train_teacher.py": train_teacher.TeacherConfig, "distill.py": distill.DistillConfig,
           "pipeline.py": pipeline.PipelineConfig}


def readme_commands() -> list[str]:
    commands, in_bash, pending = [], False, ""
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        line = pending + line.split(" #", 1)[0].strip()
        pending = ""
        if in_bash and line.endswith("\\"):  # continued on the next line
            pending = line[:-1]
            continue
        if in_bash and line.startswith(("python ", "torchrun ", "./")):
            commands.append(line)
    return commands


def test_readme_is_short_and_has_the_two_commands_first():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, len(lines)
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 100]
    assert not long, f"lines over 100 characters: {long}"
    first = [line for line in lines[:8] if line.startswith("./")]
    assert [line.split()[0] for line in first] == ["./run.sh", "./test.sh"]
    assert not re.search(r"\bissues? #?\d+|#\d+\b", README.read_text(encoding="utf-8"), re.I)


def test_readme_says_what_the_data_looks_like():
    text = README.read_text(encoding="utf-8")
    for needed in ("labels.csv", "name;label", "20 classes", "100 px"):
        assert needed in text, needed


def test_readme_has_a_command_for_each_job():
    joined = "\n".join(readme_commands())
    for needed in ("python train_teacher.py", "python distill.py", "python pipeline.py",
                   "python -m toolkit.evaluate report", "torchrun"):
        assert needed in joined, needed


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs_as_written(command, monkeypatch):
    monkeypatch.chdir(ROOT)
    words = shlex.split(command)
    if words[0].startswith("./"):
        assert os.access(ROOT / words[0], os.X_OK), words[0]
        return
    if "../shared/data/training_data" in command and not (ROOT.parent / "shared/data/training_data").is_dir():
        pytest.skip("the shared course folder is absent")
    args = [x for w in words for x in (sorted(glob.glob(w)) if "*" in w else [w])]  # the shell's globbing
    if args[0] == "torchrun":
        args = args[next(i for i, a in enumerate(args) if a.endswith(".py")):]
    else:
        args = args[1:]
    if args[:2] == ["-m", "toolkit.evaluate"]:
        evaluate.parse_args(args[2:])  # every flag and value checked as the command does
        return
    assert args[0] in CONFIGS, command
    parse_config(CONFIGS[args[0]], args[1:])  # every flag and value checked as the script does
