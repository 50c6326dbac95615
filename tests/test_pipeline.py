"""The pipeline's orchestration: recipes -> fold teachers -> distillation (stages stubbed)."""
from __future__ import annotations

import pytest

import pipeline
from toolkit.data import DataError


def test_parse_recipe_gives_folder_name_and_teacher_flags():
    name, flags = pipeline.parse_recipe("efficientnet_lite2@260:epochs=8,frozen_stages=4")
    assert name == "lite2_260px"
    assert flags == ["--model", "efficientnet_lite2", "--input-size", "260", "--epochs", "8",
                     "--frozen-stages", "4"]
    assert pipeline.parse_recipe("resnet50@224") == ("resnet50_224px", ["--model", "resnet50", "--input-size", "224"])


@pytest.mark.parametrize("bad", ["efficientnet_lite0", "efficientnet_lite0@", "@224", "lite0@big",
                                 "efficientnet_lite0@224:epochs", "efficientnet_lite0@224:=3"])
def test_parse_recipe_refuses_malformed(bad):
    with pytest.raises(DataError, match="--teacher-recipes"):
        pipeline.parse_recipe(bad)


def test_pipeline_trains_every_fold_of_every_recipe_then_distils(tmp_path, monkeypatch, make_course):
    calls = []
    monkeypatch.setattr(pipeline.train_teacher, "main", lambda argv: calls.append(("teacher", argv)) or {})
    monkeypatch.setattr(pipeline.distill, "main", lambda argv: calls.append(("distill", argv)) or {})
    root = tmp_path / "teachers"
    (root / "lite0_160px_f1").mkdir(parents=True)
    (root / "lite0_160px_f1" / "teacher.pth").write_bytes(b"x")  # reused, not retrained
    pipeline.main(["--data", str(make_course()), "--teachers-root", str(root), "--folds", "2", "--no-report",
                   "--teacher-recipes", "efficientnet_lite0@160", "efficientnet_lite2@260:epochs=9",
                   "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "model.pth")])
    teachers = [argv for kind, argv in calls if kind == "teacher"]
    outs = [argv[argv.index("--out") + 1] for argv in teachers]
    assert outs == [str(root / "lite0_160px_f0"), str(root / "lite2_260px_f0"), str(root / "lite2_260px_f1")]
    lite2 = teachers[1]
    # the recipe's own flags come last, so they win over the pipeline's --epochs
    assert lite2[lite2.index("--model") + 1] == "efficientnet_lite2"
    assert lite2[len(lite2) - 1 - lite2[::-1].index("--epochs") + 1] == "9"
    assert calls[-1][0] == "distill"


def test_pipeline_refuses_a_bad_recipe_before_any_work(tmp_path, monkeypatch, make_course):
    calls = []
    monkeypatch.setattr(pipeline.train_teacher, "main", lambda argv: calls.append(argv))
    monkeypatch.setattr(pipeline, "load_course_folder", lambda *a, **k: calls.append("decode"))
    with pytest.raises(DataError, match="lite2@x"):
        pipeline.main(["--data", str(make_course()), "--teachers-root", str(tmp_path),
                       "--teacher-recipes", "efficientnet_lite0@160", "efficientnet_lite2@x"])
    assert calls == []


def test_heldout_fold_is_never_trained_on_by_teachers_or_student(tmp_path, monkeypatch, make_course):
    """--heldout-fold 1 (a nested estimate): no fold-1 teacher, every teacher excludes fold 1, the
    student and its hard-label control both validate on it, with the same student flags."""
    calls, course = [], str(make_course())
    monkeypatch.setattr(pipeline.train_teacher, "main", lambda argv: calls.append(("teacher", argv)) or {})
    monkeypatch.setattr(pipeline.distill, "main", lambda argv: calls.append(("distill", argv)) or {})
    root = tmp_path / "teachers"
    pipeline.main(["--data", course, "--teachers-root", str(root), "--folds", "3", "--no-report",
                   "--heldout-fold", "1", "--scratch-control", "--views", "2",
                   "--teacher-recipes", "efficientnet_lite0@224", "efficientnet_lite2@224",
                   "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "model.pth")])
    teachers = [argv for kind, argv in calls if kind == "teacher"]
    assert [argv[argv.index("--fold") + 1] for argv in teachers] == ["0", "2", "0", "2"]  # each recipe
    assert all(argv[argv.index("--exclude-folds") + 1] == "1" for argv in teachers)
    student, control = [argv for kind, argv in calls if kind == "distill"]
    for argv in (student, control):
        assert argv[argv.index("--val-fold") + 1] == "1" and argv[argv.index("--views") + 1] == "2"
    assert "--scratch" in control and "--scratch" not in student
    assert control[:control.index("--scratch")] == student[:control.index("--scratch")]
    with pytest.raises(DataError, match="--heldout-fold: fold 3 does not exist"):
        pipeline.main(["--data", course, "--folds", "3", "--heldout-fold", "3"])


def test_default_teachers_are_larger_than_the_student():
    """The design asks for teachers larger than the student: each default recipe's teacher costs
    more than the shipped MyCNN per image (MACs at their own input sizes: lite0@224 384 M, lite2@224
    575 M, the student at 144 px 168 M), and the ensemble holds a backbone with more parameters."""
    from pathlib import Path

    import torch

    from toolkit.metrics import count_macs, parameter_count
    from toolkit.student import exec_architecture
    from toolkit.teachers import build_teacher
    student = exec_architecture(Path(pipeline.__file__).parent / "architecture.py")["model"]
    student_macs = count_macs(student, torch.zeros(1, 1, 100, 100))
    classes = [f"c{i}" for i in range(20)]
    teachers = []
    for recipe in pipeline.PipelineConfig().teacher_recipes:
        _, flags = pipeline.parse_recipe(recipe)
        model, size = flags[flags.index("--model") + 1], int(flags[flags.index("--input-size") + 1])
        teachers.append(build_teacher(model, classes, "rgb", size, pretrained="none"))
    assert len({t.model_name for t in teachers}) >= 2  # a heterogeneous ensemble
    for t in teachers:
        assert count_macs(t, torch.zeros(1, 3, 100, 100, dtype=torch.uint8)) > 1.5 * student_macs, t.model_name
    assert max(parameter_count(t) for t in teachers) > 1.25 * parameter_count(student)  # lite2: 4.8 M vs 3.4 M
