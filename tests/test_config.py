"""toolkit/config.py: the dataclass is the single source of --help, defaults, choices and checks;
YAML values are coerced or refused; every run's saved config.yaml replays with --config."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict

import pytest
import yaml

import distill
import pipeline
import train_teacher
from helpers_distill import TINY_SIZE, TINY_TEACHER, distill_argv, make_course_folder, write_arch
from toolkit.config import ConfigError, coerce, parse_config, run_field

CONFIGS = [(distill.DistillConfig, "distill.py"), (train_teacher.TeacherConfig, "train_teacher.py"),
           (pipeline.PipelineConfig, "pipeline.py")]


@pytest.mark.parametrize("cls,script", CONFIGS, ids=[s for _, s in CONFIGS])
def test_help_has_description_default_and_choices_for_every_option(cls, script, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_config(cls, ["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out.split("options:", 1)[1]
    # one entry per option: its first line starts with two spaces and a dash
    entries = [" ".join(e.split()) for e in re.split(r"\n(?=  -)", out)]
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        entry = next((e for e in entries if re.match(rf"{re.escape(flag)}\b(?!-)", e)), None)
        assert entry, flag
        assert field.metadata.get("help") and len(field.metadata["help"]) > 8, flag
        assert "(default:" in entry, (flag, entry)
        for choice in field.metadata.get("choices") or ():
            assert choice in entry, (flag, choice, entry)
        if field.metadata.get("min") is not None:
            assert f">= {field.metadata['min']}" in entry, (flag, entry)


def test_choices_are_real_argparse_choices():
    with pytest.raises(ConfigError, match=r"--mode: invalid choice: 'cahced' \(choose from 'cached', 'online'\)"):
        parse_config(distill.DistillConfig, ["--mode", "cahced"])
    with pytest.raises(ConfigError, match="--optimizer: invalid choice"):
        parse_config(train_teacher.TeacherConfig, ["--optimizer", "adam"])


def test_abbreviated_flags_are_refused_not_guessed():
    """argparse would read --mode as --model: a typo must not be obeyed."""
    with pytest.raises(ConfigError, match="unrecognized arguments: --mode"):
        parse_config(train_teacher.TeacherConfig, ["--mode", "resnet50"])


def test_pretrained_accepts_a_weights_file(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    assert parse_config(train_teacher.TeacherConfig, ["--pretrained", str(weights)]).pretrained == str(weights)
    with pytest.raises(ConfigError, match="--pretrained: invalid choice 'hubb' .*or an existing file"):
        parse_config(train_teacher.TeacherConfig, ["--pretrained", "hubb"])


def test_shared_run_fields_keep_each_scripts_defaults_and_the_same_checks(capsys):
    """TrainingRun's fields are declared once; each script writes its own defaults at its own
    fields (run_field), and the ranges and choices come along whatever the default."""
    teacher, student = parse_config(train_teacher.TeacherConfig, []), parse_config(distill.DistillConfig, [])
    assert (teacher.epochs, teacher.batch_size, teacher.warmup_epochs, teacher.ema_decay,
            teacher.checkpoint_every) == (6, 64, 0.5, 0.998, 100)
    assert (student.epochs, student.batch_size, student.warmup_epochs, student.ema_decay,
            student.checkpoint_every) == (20, 128, 1.0, 0.999, 200)
    assert train_teacher.TeacherConfig().epochs == 6  # the dataclass itself, not only the parser
    for cls in (train_teacher.TeacherConfig, distill.DistillConfig):
        with pytest.raises(ConfigError, match=r"--ema-decay: must be < 1, got 1.0"):
            parse_config(cls, ["--ema-decay", "1"])
        with pytest.raises(ConfigError, match="--optimizer: invalid choice"):
            parse_config(cls, ["--optimizer", "lamb"])
    with pytest.raises(SystemExit):  # --help: the script's own options first, the shared ones after
        parse_config(train_teacher.TeacherConfig, ["--help"])
    out = capsys.readouterr().out.split("options:", 1)[1]
    assert out.index("--data") < out.index("--seed") < out.index("--epochs") < out.index("--resume")
    with pytest.raises(TypeError, match="no field"):
        run_field("epoch", 3)


@pytest.mark.parametrize("value,kind,want", [
    (3, int, 3), (3.0, int, 3), ("3", int, 3), ("1e-3", float, 1e-3), (2, float, 2.0), (True, bool, True),
    ("a", str, "a"), ([1, 2.0], list[int], [1, 2]), ([], list[str], []),
])
def test_coerce_accepts(value, kind, want):
    got = coerce(value, kind)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("value,kind", [
    (2.5, int), (True, int), ("x", int), ("x", float), (None, float), ("yes", bool), (1, bool), (3, str),
    (None, str), ("a", list[str]), ([1.5], list[int]), ({"a": 1}, list[str]),
])
def test_coerce_refuses(value, kind):
    with pytest.raises(ValueError, match="expected"):
        coerce(value, kind)


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nlr: 1e-3\nmode: online\nview_kind: shift\n")  # YAML reads 1e-3 as a string: coerced
    cfg = parse_config(distill.DistillConfig, ["--config", str(path), "--epochs", "4"])
    assert (cfg.epochs, cfg.lr, cfg.mode) == (4, 1e-3, "online")


def test_cross_field_check_names_the_flag_or_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^--val-fold: fold 3 does not exist in a 3-fold split"):
        parse_config(distill.DistillConfig, ["--val-fold", "3"])  # the recipe's 3 folds
    path = tmp_path / "c.yaml"
    path.write_text("val_fold: 3\nfolds: 3\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: val_fold: fold 3 does not exist"):
        parse_config(distill.DistillConfig, ["--config", str(path)])


# ---- every run's saved config.yaml replays ---------------------------------------------------
def test_saved_teacher_and_student_configs_replay(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    data = make_course_folder(tmp_path / "data", counts={"book": 6, "car": 6, "cat": 6})
    teacher_argv = ["--data", str(data), "--out", str(tmp_path / "t"), "--model", TINY_TEACHER, "--pretrained",
                    "none", "--input-size", str(TINY_SIZE), "--epochs", "1", "--batch-size", "8", "--folds", "3",
                    "--frozen-stages", "0", "--no-trunk-cache", "--checkpoint-every", "0", "--device", "cpu"]
    train_teacher.main(teacher_argv)
    saved = yaml.safe_load((tmp_path / "t" / "config.yaml").read_text())
    assert {"data_fingerprint", "classes"} <= saved.keys()  # recorded extras, ignored on replay
    replayed = parse_config(train_teacher.TeacherConfig, ["--config", str(tmp_path / "t" / "config.yaml")])
    assert replayed == parse_config(train_teacher.TeacherConfig, teacher_argv)

    arch = write_arch(tmp_path / "arch.py")
    student_argv = distill_argv(data, arch, tmp_path / "s" / "model.pth", tmp_path / "sw", hard_labels=True, epochs=1)
    distill.main(student_argv)
    replayed = parse_config(distill.DistillConfig, ["--config", str(tmp_path / "sw" / "config.yaml")])
    assert replayed == parse_config(distill.DistillConfig, student_argv)


def test_pipeline_config_replays(tmp_path):
    """pipeline.py writes work_dir/config.yaml the same way (yaml.safe_dump of the dataclass)."""
    path = tmp_path / "p.yaml"
    cfg = parse_config(pipeline.PipelineConfig, ["--seed", "3", "--no-report", "--work-dir", str(tmp_path)])
    path.write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    assert parse_config(pipeline.PipelineConfig, ["--config", str(path)]) == cfg


@pytest.mark.parametrize("command", ["report", "grader", "predict", "export", "compare"])
def test_evaluate_help_describes_every_option(command, capsys):
    from toolkit import evaluate
    with pytest.raises(SystemExit) as stop:
        evaluate.parse_args([command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out.split("options:", 1)[1]
    entries = [" ".join(e.split()) for e in re.split(r"\n(?=  -)", out) if e.strip()]
    for entry in entries:
        if entry.startswith("-h"):
            continue
        flag, _, rest = entry.partition(" ")
        words = rest.split()
        described = [w for w in words if not w.isupper() and w not in ("[", "]", "...")]
        assert len(described) >= 3, entry  # more than the flag and its metavar
