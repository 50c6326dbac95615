"""One recipe, one source: train_teacher.py, distill.py and pipeline.py read the same recipe
object (toolkit/recipe.py); the pipeline passes paths, the fold, the member and the seed, no
hyper-parameters. Orchestration tests stub the two training scripts."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

import distill
import pipeline
import train_teacher
from toolkit.config import ConfigError, parse_config
from toolkit.data import DataError
from toolkit.engine import RESUME_IRRELEVANT, compared_config
from toolkit.recipe import Recipe, RecipeError, fold_suffix, load_recipe, parse_member, recipe_field_defaults

ROOT = Path(__file__).resolve().parents[1]
# what the pipeline may tell the scripts: where things are, which fold and member, which seed
PATH_AND_FOLD_FLAGS = {"--data", "--recipe", "--member", "--fold", "--exclude-folds", "--seed", "--out", "--resume",
                       "--teachers", "--val-fold", "--view-seed", "--work-dir", "--hard-labels"}


def flags_of(argv: list[str]) -> set[str]:
    return {a for a in argv if a.startswith("--")}


def stub_scripts(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(pipeline.train_teacher, "main", lambda argv: calls.append(("teacher", argv)) or {})
    monkeypatch.setattr(pipeline.distill, "main", lambda argv: calls.append(("distill", argv)) or {})
    return calls


def test_parse_member_gives_folder_name_and_fields():
    name, flags = parse_member("efficientnet_lite2@260:epochs=8,frozen_stages=4")
    assert name == "lite2_260px"
    assert flags == {"model": "efficientnet_lite2", "input_size": "260", "epochs": "8", "frozen_stages": "4"}
    assert parse_member("resnet50@224") == ("resnet50_224px", {"model": "resnet50", "input_size": "224"})


@pytest.mark.parametrize("bad", ["efficientnet_lite0", "efficientnet_lite0@", "@224", "lite0@big",
                                 "efficientnet_lite0@224:epochs", "efficientnet_lite0@224:=3"])
def test_parse_member_refuses_malformed(bad):
    with pytest.raises(RecipeError, match="teachers: "):
        parse_member(bad)


def test_script_defaults_are_the_default_recipe():
    """The command line's defaults (and the dataclasses') are the default recipe: it sets nothing
    the fields do not already say (the first teacher's model and size, and the teacher's fold
    under teacher_split all, are the teacher's field literals)."""
    teacher = parse_config(train_teacher.TeacherConfig, [])
    student = parse_config(distill.DistillConfig, [])
    recipe = load_recipe()
    assert recipe == Recipe()
    assert teacher.folds == student.folds == recipe.n_folds
    assert teacher.fold == (-1 if recipe.teacher_split == "all" else 0)  # a teacher the recipe uses
    for cls, config, section in ((train_teacher.TeacherConfig, teacher, "teacher"),
                                 (distill.DistillConfig, student, "student")):
        for key, value in recipe_field_defaults(cls, recipe, section).items():
            assert getattr(config, key) == value == getattr(cls(), key), key
    first = parse_member(recipe.teachers[0])[1]
    assert (teacher.model, str(teacher.input_size)) == (first["model"], first["input_size"])
    assert asdict(train_teacher.TeacherConfig()) == asdict(teacher)
    assert asdict(distill.DistillConfig()) == asdict(student)


def test_train_teacher_trains_exactly_the_committed_teachers():
    """The committed teachers/ are the default recipe's (one <name>_all per recipe under teacher_split
    all): `python train_teacher.py` trains exactly teachers/lite0_224px_all, and `--member` names the
    others (same config, except the fields that never change the result)."""
    recipe = load_recipe()
    teachers = [(name, fold) for name, _ in recipe.members() for fold in recipe.teacher_folds()]
    assert sorted(f.name for f in (ROOT / "teachers").iterdir()) == sorted(n + fold_suffix(f) for n, f in teachers)
    for name, fold in teachers:
        folder = ROOT / "teachers" / (name + fold_suffix(fold))
        argv = (["--fold", str(fold)] if fold >= 0 else []) + \
            (["--member", name] if name != recipe.members()[0][0] else [])
        cfg = asdict(parse_config(train_teacher.TeacherConfig, argv))
        assert cfg["out"] == f"teachers/{folder.name}"
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        differ = {k for k in compared_config(cfg) if k in saved and saved[k] != cfg[k]}  # the pipeline's rule
        assert differ == set(), (folder.name, differ)


def test_distill_defaults_are_the_shipped_students_config():
    """`python distill.py` with no flags is the run that made the shipped model.pth."""
    shipped = json.loads((ROOT / "model.provenance.json").read_text())["config"]
    now = asdict(parse_config(distill.DistillConfig, []))
    new = {k: distill.DistillConfig.RENAMED.get(k, k) for k in shipped}  # scratch: now hard_labels
    differ = {k for k in shipped if k not in RESUME_IRRELEVANT and shipped[k] != now.get(new[k])}
    assert differ == set(), {k: (shipped[k], now.get(new[k])) for k in differ}


def test_a_recipe_file_changes_all_three_scripts_alike(tmp_path, monkeypatch, make_course):
    recipe = tmp_path / "alt.yaml"
    recipe.write_text(yaml.safe_dump({"folds": 4, "views": 3, "teacher_split": "folds",
                                      "teachers": ["efficientnet_lite1@240:epochs=9", "resnet18@160"],
                                      "teacher": {"epochs": 2, "pretrained": "none"}, "student": {"epochs": 7}}))
    teacher = parse_config(train_teacher.TeacherConfig, ["--recipe", str(recipe)])
    assert (teacher.folds, teacher.views, teacher.model, teacher.input_size, teacher.epochs) == \
        (4, 3, "efficientnet_lite1", 240, 9)  # the member's own flag wins over the teacher section
    other = parse_config(train_teacher.TeacherConfig, ["--recipe", str(recipe), "--member", "resnet18_160px"])
    assert (other.model, other.input_size, other.epochs, other.pretrained) == ("resnet18", 160, 2, "none")
    student = parse_config(distill.DistillConfig, ["--recipe", str(recipe)])
    assert (student.folds, student.views, student.epochs) == (4, 3, 7)
    assert parse_config(distill.DistillConfig, ["--recipe", str(recipe), "--epochs", "5"]).epochs == 5  # flags win

    calls = stub_scripts(monkeypatch)
    root = tmp_path / "teachers"
    pipeline.main(["--data", str(make_course()), "--recipe", str(recipe), "--teachers-root", str(root), "--no-report",
                   "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "model.pth")])
    teachers = [argv for kind, argv in calls if kind == "teacher"]
    assert [argv[argv.index("--out") + 1] for argv in teachers] == \
        [str(root / f"{m}_f{f}") for m in ("lite1_240px", "resnet18_160px") for f in range(4)]
    for kind, argv in calls:
        assert flags_of(argv) <= PATH_AND_FOLD_FLAGS, (kind, flags_of(argv) - PATH_AND_FOLD_FLAGS)
        assert argv[argv.index("--recipe") + 1] == str(recipe)  # each script reads the recipe itself
    assert calls[-1][0] == "distill"
    written = yaml.safe_load((tmp_path / "work" / "recipe.yaml").read_text())  # replays with --recipe
    assert load_recipe(tmp_path / "work" / "recipe.yaml").as_yaml_dict() == load_recipe(recipe).as_yaml_dict()
    assert written["teachers"][1] == "resnet18@160"


def test_pipeline_reuses_finished_teachers_of_its_recipe_and_refuses_others(tmp_path, monkeypatch, make_course):
    calls = stub_scripts(monkeypatch)
    course, root = str(make_course()), tmp_path / "teachers"
    base = ["--data", course, "--teachers-root", str(root), "--no-report", "--work-dir", str(tmp_path / "work"),
            "--out", str(tmp_path / "model.pth")]
    finished = root / "lite2_224px_all"  # the default recipe: one teacher per recipe on every image
    finished.mkdir(parents=True)
    cfg = asdict(parse_config(train_teacher.TeacherConfig, pipeline.teacher_argv(
        parse_config(pipeline.PipelineConfig, base), "lite2_224px", -1)))
    (finished / "config.yaml").write_text(yaml.safe_dump(cfg))
    (finished / "teacher.pth").write_bytes(b"x")
    (finished / "checkpoint.pth").write_bytes(b"left by a kill after teacher.pth was written")
    pipeline.main(base)
    outs = [argv[argv.index("--out") + 1] for kind, argv in calls if kind == "teacher"]
    assert outs == [str(root / "lite0_224px_all")]
    assert not (finished / "checkpoint.pth").exists()

    (finished / "config.yaml").write_text(yaml.safe_dump({**cfg, "epochs": 8}))
    with pytest.raises(DataError, match="lite2_224px_all: a finished teacher of another run.*epochs was 8"):
        pipeline.main(base)


@pytest.mark.parametrize("recipe,folds", [("", ["-1", "-1"]), ("fold_teachers.yaml", ["0", "2", "0", "2"])])
def test_heldout_fold_is_never_trained_on_by_teachers_or_student(tmp_path, monkeypatch, make_course, recipe, folds):
    """--heldout-fold 1 (a nested estimate): no fold-1 teacher, every teacher excludes fold 1, the
    student and its hard-label control both validate on it, with the same student flags; for the
    default recipe's teachers of every image and for fold teachers alike."""
    calls, course = stub_scripts(monkeypatch), str(make_course())
    tables = []
    monkeypatch.setattr(pipeline, "paired_table", lambda fold, pairs, path: tables.append((fold, pairs)))
    root = tmp_path / "teachers"
    pipeline.main(["--data", course, "--teachers-root", str(root), "--no-report", "--heldout-fold", "1",
                   *(["--recipe", str(ROOT / "recipes" / recipe)] if recipe else []),
                   "--hard-label-control", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "model.pth")])
    teachers = [argv for kind, argv in calls if kind == "teacher"]
    assert [argv[argv.index("--fold") + 1] for argv in teachers] == folds  # each recipe
    assert all(argv[argv.index("--exclude-folds") + 1] == "1" for argv in teachers)
    student, control = [argv for kind, argv in calls if kind == "distill"]
    for argv in (student, control):
        assert argv[argv.index("--val-fold") + 1] == "1"
    assert "--hard-labels" in control and "--hard-labels" not in student
    assert tables == [(1, [(0, tmp_path / "model.pth", tmp_path / "work" / "scratch" / "model.pth")])]
    strip = {"--out", "--work-dir"}
    keep = [a for i, a in enumerate(student) if a not in strip and (i == 0 or student[i - 1] not in strip)]
    assert keep == [a for i, a in enumerate(control[:-1]) if a not in strip and (i == 0 or control[i - 1] not in strip)]
    with pytest.raises(ConfigError, match="--heldout-fold: fold 3 does not exist"):
        pipeline.main(["--data", course, "--heldout-fold", "3"])


@pytest.mark.parametrize("heldout", [-1, 1])
def test_teacher_split_all_trains_one_teacher_per_recipe_and_distils_from_exactly_those(
        tmp_path, monkeypatch, make_course, heldout):
    """teacher_split: all -> one teacher <name>_all per recipe on every image (--fold -1), minus
    the held-out fold of a nested estimate; the student's ensemble is exactly the recipe's
    teachers, never another recipe's teacher left under the same root."""
    calls, course = stub_scripts(monkeypatch), str(make_course())
    recipe = tmp_path / "all.yaml"
    recipe.write_text(yaml.safe_dump({"teacher_split": "all"}))
    root = tmp_path / "teachers"
    stale = root / "lite0_224px_f0"  # a fold teacher of recipes/fold_teachers.yaml, from an earlier run
    stale.mkdir(parents=True)
    (stale / "teacher.pth").write_bytes(b"x")
    pipeline.main(["--data", course, "--recipe", str(recipe), "--teachers-root", str(root), "--no-report",
                   "--heldout-fold", str(heldout), "--work-dir", str(tmp_path / "work"),
                   "--out", str(tmp_path / "model.pth")])
    teachers = [argv for kind, argv in calls if kind == "teacher"]
    expected = [str(root / "lite0_224px_all"), str(root / "lite2_224px_all")]
    assert [argv[argv.index("--out") + 1] for argv in teachers] == expected
    assert all(argv[argv.index("--fold") + 1] == "-1" for argv in teachers)
    for argv in teachers:
        assert (argv[argv.index("--exclude-folds") + 1] if "--exclude-folds" in argv else None) == \
            (str(heldout) if heldout >= 0 else None)
    (student,) = [argv for kind, argv in calls if kind == "distill"]
    i = student.index("--teachers")
    assert student[i + 1:i + 3] == expected and student[i + 3].startswith("--")
    assert load_recipe(recipe).teacher_folds(heldout) == [-1]
    assert load_recipe(ROOT / "recipes" / "fold_teachers.yaml").teacher_folds(heldout) == \
        [f for f in range(3) if f != heldout]


def test_default_recipe_is_in_sample_teachers_and_twenty_epochs_on_mixed_views(tmp_path):
    """The default recipe (issue 21's nested pairs): one teacher per recipe, the student and its
    control on 2 + 4 mixed views for 20 epochs, KD T = 1, alpha = 0.5; the teachers train on the
    2 plain views; both scripts accept it (PipelineConfig.check)."""
    recipe = load_recipe()
    assert recipe.teacher_split == "all" and recipe.teacher_folds(0) == [-1]
    assert parse_config(train_teacher.TeacherConfig, []).views == 2
    cfg = parse_config(pipeline.PipelineConfig, ["--heldout-fold", "0", "--hard-label-control",
                                                 "--teachers-root", str(tmp_path / "t")])
    for scratch in (False, True):
        student = parse_config(distill.DistillConfig, pipeline.student_argv(cfg, tmp_path / "w", scratch))
        assert (student.view_kind, student.views, student.epochs, student.hard_labels) == ("mixed", 6, 20, scratch)
        assert (student.loss, student.temperature, student.alpha) == ("kd", 1.0, 0.5)
        assert student.teachers == [str(tmp_path / "t" / "lite0_224px_all"), str(tmp_path / "t" / "lite2_224px_all")]


def test_heldout_recipe_is_the_default_with_five_folds():
    nested = load_recipe(ROOT / "recipes" / "heldout.yaml")
    assert nested.folds == 5 and nested.as_yaml_dict() == {**load_recipe().as_yaml_dict(), "folds": 5}


def test_default_teachers_are_larger_than_the_student():
    """The design asks for teachers larger than the student: each default recipe's teacher costs
    more than the shipped MyCNN per image (MACs at their own input sizes: lite0@224 384 M, lite2@224
    575 M, the student at 144 px 168 M), and the ensemble holds a backbone with more parameters."""
    import torch

    from toolkit.metrics import count_macs, parameter_count
    from toolkit.student import exec_architecture
    from toolkit.teachers import build_teacher
    student = exec_architecture(ROOT / "architecture.py")["model"]
    student_macs = count_macs(student, torch.zeros(1, 1, 100, 100))
    classes = [f"c{i}" for i in range(20)]
    teachers = [build_teacher(flags["model"], classes, "rgb", int(flags["input_size"]), pretrained="none")
                for _, flags in load_recipe().members()]
    assert len({t.model_name for t in teachers}) >= 2  # a heterogeneous ensemble
    for t in teachers:
        assert count_macs(t, torch.zeros(1, 3, 100, 100, dtype=torch.uint8)) > 1.5 * student_macs, t.model_name
    assert max(parameter_count(t) for t in teachers) > 1.25 * parameter_count(student)  # lite2: 4.8 M vs 3.4 M


def test_student_seeds_give_the_paired_heldout_table(tmp_path, monkeypatch, make_course, capsys):
    """--student-seeds: each extra seed trains the student and its control on the same teachers,
    split (--split-seed) and views; the run ends with the paired table and heldout_pairs.csv."""
    calls = []
    accuracy = {(0, False): 0.88, (0, True): 0.87, (1, False): 0.90, (1, True): 0.87, (2, False): 0.86,
                (2, True): 0.865}

    def fake_distill(argv):
        calls.append(argv)
        seed, scratch = int(argv[argv.index("--seed") + 1]), "--hard-labels" in argv
        out = Path(argv[argv.index("--out") + 1])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"student")
        out.with_suffix(".provenance.json").write_text(json.dumps(
            {"val_fold": 1, "student_val": {"val_acc": accuracy[seed, scratch]},
             "config": {"seed": seed, "split_seed": 0, "folds": 3, "scratch": scratch}}))
        return {}
    monkeypatch.setattr(pipeline.train_teacher, "main", lambda argv: {})
    monkeypatch.setattr(pipeline.distill, "main", fake_distill)
    work = tmp_path / "work"
    pipeline.main(["--data", str(make_course()), "--teachers-root", str(tmp_path / "t"), "--no-report",
                   "--heldout-fold", "1", "--hard-label-control", "--student-seeds", "1", "2", "0",
                   "--work-dir", str(work), "--out", str(tmp_path / "model.pth")])
    assert [(a[a.index("--seed") + 1], "--hard-labels" in a) for a in calls] == \
        [("0", False), ("0", True), ("1", False), ("1", True), ("2", False), ("2", True)]
    for argv in calls[2:]:  # other seeds: the pipeline's split and views, their own folders
        assert argv[argv.index("--split-seed") + 1] == "0" and argv[argv.index("--view-seed") + 1] == "0"
        assert f"seed{argv[argv.index('--seed') + 1]}" in argv[argv.index("--out") + 1]
    assert "--split-seed" not in calls[0]  # the shipped path is the same command as before
    rows = (work / "heldout_pairs.csv").read_text().splitlines()
    assert rows == ["fold,seed,distilled,hard_label", "1,0,88.0,87.0", "1,1,90.0,87.0", "1,2,86.0,86.5"]
    out = capsys.readouterr().out
    assert "mean gap +1.17 points (standard error 1.01) over 3 pair(s), positive in 2; mean accuracy distilled " \
        "88.00 %, hard-label 86.83 %" in out


def write_provenance(path: Path, val_fold=1, seed=0, split_seed=0, scratch=False, acc=0.88, seen=0) -> Path:
    """A provenance file as distill.py wrote it before --scratch became --hard-labels (both are read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"val_fold": val_fold, "student_val": {"val_acc": acc},
                                "ensemble": {} if scratch else {"val_seen_by_teachers": seen},
                                "config": {"seed": seed, "split_seed": split_seed, "folds": 3, "scratch": scratch}}))
    return path


@pytest.mark.parametrize("control,culprit", [
    ({"split_seed": -1, "seed": 1}, "not the same held-out images"),   # --seed 1 without --split-seed 0
    ({"val_fold": 0}, "not the same held-out images"),
    ({"seed": 2}, "seed 2"),
    ({"scratch": False}, "expected a distilled student, then its --hard-labels control"),
])
def test_a_pair_is_one_fold_split_and_seed_distilled_then_control(tmp_path, control, culprit):
    from toolkit.estimates import read_pair
    distilled = write_provenance(tmp_path / "d.json", seed=1, acc=0.891)
    fine = write_provenance(tmp_path / "ok.json", seed=1, scratch=True, acc=0.8708)
    assert read_pair(distilled, fine) == {"fold": 1, "seed": 1, "distilled": 89.1, "hard_label": 87.08}
    bad = write_provenance(tmp_path / "c.json", **{"seed": 1, "scratch": True, "acc": 0.87, **control})
    with pytest.raises(DataError, match=culprit):
        read_pair(distilled, bad)
    leaked = write_provenance(tmp_path / "leak.json", seed=1, seen=5)
    with pytest.raises(DataError, match="5 of its 0 val images were training images"):
        read_pair(leaked, fine)


def test_heldout_pairs_script_adds_replaces_and_summarises(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("heldout_pairs", ROOT / "scripts" / "heldout_pairs.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    csv = tmp_path / "pairs.csv"
    csv.write_text("fold,seed,distilled,hard_label\n0,0,89.22,87.08\n0,1,88.0,88.5\n")
    d = write_provenance(tmp_path / "d.json", seed=1, acc=0.89)
    c = write_provenance(tmp_path / "c.json", seed=1, scratch=True, acc=0.87)
    d0, c0 = (write_provenance(tmp_path / f"{n}0.json", val_fold=0, seed=1, scratch=n == "c", acc=a)
              for n, a in (("d", 0.9), ("c", 0.86)))
    rows = script.main([str(csv), "--add", str(d), str(c), "--add", str(d0), str(c0)])
    assert csv.read_text().splitlines() == ["fold,seed,distilled,hard_label", "0,0,89.22,87.08", "0,1,90.0,86.0",
                                            "1,1,89.0,87.0"]  # fold 0 seed 1 replaced, fold 1 added, sorted
    assert len(rows) == 3
    out = capsys.readouterr().out
    assert "mean gap +2.71 points (standard error 0.64) over 3 pair(s), positive in 3; mean accuracy distilled " \
           "89.41 %, hard-label 86.69 %" in out
    assert "mean gap +2.00 points (one pair: no standard error) over 1 pair(s)" in out  # fold 1: one pair, no "nan"
    bad = write_provenance(tmp_path / "x.json", seed=2, scratch=True)
    before = csv.read_text()
    with pytest.raises(DataError):
        script.main([str(csv), "--add", str(d), str(bad)])
    assert csv.read_text() == before  # nothing written for a refused pair


def test_train_teachers_default_fold_follows_the_recipes_split():
    """`python train_teacher.py` trains a teacher its recipe uses: <name>_all under teacher_split
    all (the default), fold 0 of the split under teacher_split folds."""
    default = parse_config(train_teacher.TeacherConfig, [])
    assert (default.fold, default.out) == (-1, "teachers/lite0_224px_all")
    folds = parse_config(train_teacher.TeacherConfig, ["--recipe", str(ROOT / "recipes" / "fold_teachers.yaml")])
    assert (folds.fold, folds.out) == (0, "teachers/lite0_224px_f0")
    student = parse_config(distill.DistillConfig, ["--recipe", str(ROOT / "recipes" / "fold_teachers.yaml")])
    assert (student.view_kind, student.views, student.epochs) == ("shift", 2, 10)  # the recipe shipped before


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_every_committed_recipe_configures_both_scripts(recipe):
    """Each file of recipes/ loads, and both scripts parse it (their own sections and fields); a
    recipe whose teachers train on mixed views gives the student exactly those views (2 + M), so
    distill.py reads the labels the teachers stored."""
    path = str(ROOT / "recipes" / recipe)
    load_recipe(path)
    teacher = parse_config(train_teacher.TeacherConfig, ["--recipe", path])
    student = parse_config(distill.DistillConfig, ["--recipe", path])
    if teacher.mixed_views:
        assert (student.view_kind, student.views) == ("mixed", 2 + teacher.mixed_views)
        assert (student.view_seed, student.min_crop, student.cutmix_prob) == \
            (teacher.view_seed, teacher.min_crop, teacher.cutmix_prob)
