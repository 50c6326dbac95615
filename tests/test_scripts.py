"""The held-out teacher checks in scripts/ (heldout_teachers.py, target_input.py): they score the
right teachers, and bad input (a missing teacher or data folder, a teacher that trained on the
fold, flags out of range) ends in one line naming the culprit before anything is scored."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from helpers import assert_one_line_error
from helpers_distill import ROOT, build_tiny_teacher, make_course_folder
from toolkit.cli import run_main


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPTS = ("heldout_teachers", "target_input")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts")
    data = make_course_folder(root / "data")
    held = [build_tiny_teacher(root / f"held{s}", config={"fold": 0}, seed=s) for s in range(2)]
    saw = build_tiny_teacher(root / "all", config={"fold": -1})
    return root, data, held, saw


def run(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """-> (exit code, stdout, stderr) of the script's main run as its command line runs it."""
    code = 0
    try:
        run_main(load_script(script).main, argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err


def test_both_scripts_score_held_out_teachers_and_their_ensemble(folders, cache_dir, capsys):
    root, data, held, _ = folders
    code, out, err = run("heldout_teachers", ["--folds", "3", "--data", str(data), *map(str, held)], capsys)
    assert code == 0, err
    scores = [line for line in out.splitlines() if not line.startswith("fast passes:")]  # once per process
    assert [line.split()[0] for line in scores] == ["held0", "held1", "ensemble"]
    code, out, err = run("target_input", ["--data", str(data), *map(str, held)], capsys)
    assert code == 0, err
    rows = [line.split()[:2] for line in out.splitlines() if not line.startswith("fast passes:")]
    assert rows == [[kind, name] for kind in ("rgb", "grey") for name in ("held0", "held1", "ensemble")]


def test_heldout_teachers_writes_its_fold_rows_into_the_csv(folders, cache_dir, capsys, tmp_path):
    """--csv: fold,member,accuracy (percent),nll; one row per teacher and one 'ensemble' row; a
    rerun of the same fold and members replaces its rows, other rows stay."""
    import csv
    root, data, held, _ = folders
    path = tmp_path / "heldout_teachers.csv"
    path.write_text("fold,member,accuracy,nll\n1,other/x,50.0,1.0\n")
    for _ in range(2):
        code, out, err = run("heldout_teachers", ["--data", str(data), "--csv", str(path), "--label", "tiny",
                                                  *map(str, held)], capsys)
        assert code == 0, err
    rows = list(csv.DictReader(path.open()))
    assert [(r["fold"], r["member"]) for r in rows] == [("1", "other/x"), ("0", "tiny/held0"), ("0", "tiny/held1"),
                                                        ("0", "tiny/ensemble")]
    printed = {line.split()[0]: float(line.split()[2]) for line in out.splitlines() if " acc " in line}
    for r in rows[1:]:
        assert float(r["accuracy"]) == pytest.approx(100 * printed[r["member"].split("/")[1]], abs=0.01)
        assert float(r["nll"]) > 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_teacher_that_trained_on_the_fold_is_refused_before_scoring(script, folders, cache_dir, capsys):
    root, data, held, saw = folders
    code, out, err = run(script, ["--folds", "3", "--data", str(data), str(held[0]), str(saw)], capsys)
    assert out == ""
    assert_one_line_error(err.strip(), saw, "trained on images of fold 0", rc=code, code=1)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_missing_teacher_is_named_before_the_data_is_read(script, folders, cache_dir, capsys):
    root, data, held, _ = folders
    missing = root / "no_such_teacher"
    code, out, err = run(script, ["--data", str(root / "no_such_data"), str(held[0]), str(missing)], capsys)
    assert out == ""
    assert_one_line_error(err.strip(), missing, rc=code, code=1)
    assert "no_such_data" not in err


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_missing_data_folder_is_one_line(script, folders, cache_dir, capsys):
    root, data, held, _ = folders
    code, out, err = run(script, ["--data", str(root / "no_such_data"), str(held[0])], capsys)
    assert out == ""
    assert_one_line_error(err.strip(), "no_such_data", rc=code, code=1)


@pytest.mark.parametrize("script, flags", [("heldout_teachers", ["--folds", "1"]),
                                           ("heldout_teachers", ["--folds", "3", "--fold", "3"]),
                                           ("target_input", ["--folds", "1"]),
                                           ("target_input", ["--folds", "3", "--val-fold", "3"]),
                                           ("target_input", ["--val-fold", "-1"])])
def test_flags_out_of_range_are_config_errors(script, flags, folders, cache_dir, capsys):
    root, data, held, _ = folders
    code, out, err = run(script, [*flags, "--data", str(data), str(held[0])], capsys)
    assert out == ""
    assert_one_line_error(err.strip(), flags[-2], rc=code, code=2)
