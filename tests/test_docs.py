"""The docs describe today's code: docs/results.md stays one page (<= 200 lines); every command
quoted in it or in docs/design.md names a script that exists and flags that script takes (its
--help, today); every relative link and every path of the repository they quote exists."""
from __future__ import annotations

import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "results.md", ROOT / "docs" / "design.md", ROOT / "README.md"]
# the repository's own folders: a quoted path under one of these must exist (placeholders such as
# teachers/lite0_224px_fF and outputs under runs/ are not files of the repository)
REPO_DIRS = ("docs/", "scripts/", "bench/", "toolkit/", "tests/", "recipes/")


def quoted(text: str) -> list[str]:
    """Backticked spans and indented code lines, whitespace folded, with shell variables set on
    an earlier line of the same block (X="...") expanded."""
    spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", text)]
    env: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith("    "):
            env = {}
            continue
        for name, value in re.findall(r'(\w+)="([^"]*)"', line):
            env[name] = value
        spans.append(re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), line.strip()))
    return spans


def commands(doc: Path) -> list[tuple[str, list[str]]]:
    """(script, its --flags) of every ``python <script>.py ...`` a doc quotes."""
    out = []
    for span in quoted(doc.read_text(encoding="utf-8")):
        for part in re.split(r"[;&|]", span):
            words = part.split()
            for i, w in enumerate(words[:-1]):
                if re.fullmatch(r"python3?", w) and words[i + 1].endswith(".py"):
                    out.append((words[i + 1], [x.split("=")[0] for x in words[i + 2:] if x.startswith("--")]))
    return out


@lru_cache(maxsize=None)
def help_text(script: str) -> str:
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script} --help: {done.stderr.strip()[-300:]}"
    return done.stdout


def test_results_page_is_one_page():
    lines = (ROOT / "docs" / "results.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"docs/results.md has {len(lines)} lines; move older sections to docs/history/"


CASES = [(doc.relative_to(ROOT).as_posix(), script, flags) for doc in DOCS[:2] for script, flags in commands(doc)]


def test_the_docs_quote_commands():
    assert {"distill.py", "bench/passes.py", "scripts/heldout_pairs.py"} <= {s for _, s, _ in CASES}


@pytest.mark.parametrize("doc,script,flags", CASES, ids=[f"{d}: {s} {' '.join(f)}" for d, s, f in CASES])
def test_every_quoted_command_runs_on_todays_code(doc, script, flags):
    assert (ROOT / script).is_file(), f"{doc} quotes {script}, which does not exist"
    text = help_text(script)
    unknown = [f for f in flags if not re.search(rf"{re.escape(f)}\b", text)]
    assert not unknown, f"{doc}: {script} takes no {unknown}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_links_and_quoted_paths_exist(doc):
    text = doc.read_text(encoding="utf-8")
    missing = [link for link in re.findall(r"\]\(([^)#\s]+)", text)
               if not link.startswith(("http:", "https:")) and not (doc.parent / link).exists()]
    for span in quoted(text):
        for word in span.split():
            word = word.strip(",.;:()'\"")
            if word.startswith(REPO_DIRS) and not any(c in word for c in "*<>{}$") \
                    and not (ROOT / word).exists():
                missing.append(word)
    assert not missing, f"{doc.name} refers to what does not exist: {sorted(set(missing))}"
