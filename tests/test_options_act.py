"""An option either acts on the path it is given or is refused in one line before any work:
never accepted and ignored. The default path (mixed views, a cached teacher trunk) first."""
from __future__ import annotations

import pytest

import distill
import pipeline
import train_teacher
from helpers import assert_one_line_error
from helpers_distill import build_tiny_teacher, distill_argv, make_course_folder, write_arch
from toolkit.cli import run_main
from toolkit.config import ConfigError, parse_config

# (flags, the flag refused): on the default path unless the flags choose another
DISTILL_REFUSED = [
    (["--calibrate"], "--calibrate"),                                    # mixed views: no fitted temperature
    (["--ensemble-weights", "fit"], "--ensemble-weights"),
    (["--ensemble-weights", "greedy"], "--ensemble-weights"),
    (["--max-shift", "4"], "--max-shift"),                               # mixed views crop, not shift
    (["--label-smoothing", "0.2"], "--label-smoothing"),                 # distilled: no smoothed hard labels
    (["--view-kind", "shift", "--min-crop", "0.5"], "--min-crop"),
    (["--view-kind", "shift", "--cutmix-prob", "0.9"], "--cutmix-prob"),
    (["--view-kind", "shift", "--target-input", "grey"], "--target-input"),
    (["--hard-labels", "--alpha", "0.3"], "--alpha"),
    (["--hard-labels", "--temperature", "2"], "--temperature"),
    (["--hard-labels", "--loss", "dist"], "--loss"),
    (["--hard-labels", "--calibrate"], "--calibrate"),
    (["--mode", "online", "--view-kind", "shift", "--views", "3"], "--views"),
    (["--mode", "online", "--view-kind", "shift", "--student-frozen-stages", "3"], "--student-frozen-stages"),
]
DISTILL_ACCEPTED = [
    ["--view-kind", "shift", "--calibrate", "--ensemble-weights", "greedy", "--max-shift", "4"],
    ["--min-crop", "0.5", "--cutmix-prob", "0.9", "--target-input", "grey", "--alpha", "0.3"],
    ["--hard-labels", "--label-smoothing", "0.2"],
    ["--mode", "online", "--view-kind", "shift", "--max-shift", "4", "--mixup", "0.2"],
]
TEACHER_REFUSED = [
    (["--trivial-augment"], "--trivial-augment"),                        # a cached trunk trains on fixed views
    (["--mixup", "0.2"], "--mixup"),
    (["--cutmix", "1"], "--cutmix"),
    (["--no-trunk-cache", "--views", "3"], "--views"),
    (["--frozen-stages", "0", "--views", "3"], "--views"),
]
TEACHER_ACCEPTED = [
    ["--no-trunk-cache", "--trivial-augment", "--mixup", "0.2", "--cutmix", "1"],
    ["--frozen-stages", "0", "--trivial-augment"],
    ["--views", "3"],
]


REFUSED = [(distill.DistillConfig, f, c) for f, c in DISTILL_REFUSED] + \
    [(train_teacher.TeacherConfig, f, c) for f, c in TEACHER_REFUSED]
ACCEPTED = [(distill.DistillConfig, f) for f in DISTILL_ACCEPTED] + \
    [(train_teacher.TeacherConfig, f) for f in TEACHER_ACCEPTED]


@pytest.mark.parametrize("cls,flags,culprit", REFUSED, ids=[f"{c.__name__}: {' '.join(f)}" for c, f, _ in REFUSED])
def test_option_that_cannot_act_is_refused(cls, flags, culprit):
    with pytest.raises(ConfigError, match=rf"^{culprit}: acts on .* only, not on this run's path; drop it$"):
        parse_config(cls, flags)


@pytest.mark.parametrize("cls,flags", ACCEPTED, ids=[f"{c.__name__}: {' '.join(f)}" for c, f in ACCEPTED])
def test_option_on_its_own_path_is_accepted(cls, flags):
    parse_config(cls, flags)


def test_a_refusal_is_one_line_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as stop:
        run_main(distill.main, ["--calibrate"], prog="distill.py")
    line = assert_one_line_error(capsys.readouterr().err.strip(), culprit="--calibrate", rc=stop.value.code, code=2)
    assert line.startswith("error: --calibrate: acts on"), line


def test_no_oof_with_teachers_of_every_image_is_refused(tmp_path):
    """On the default path (teachers of every image) every image is in-sample for every teacher:
    --no-oof could not change a target, so it is refused (with fold teachers it acts:
    tests/test_mixviews.py labels the same views with oof=False and True)."""
    data = make_course_folder(tmp_path / "data", counts={"book": 6, "car": 6, "cat": 6})
    teachers = [build_tiny_teacher(tmp_path / f"t{i}", config={"fold": -1}, seed=i) for i in range(2)]
    argv = distill_argv(data, write_arch(tmp_path / "arch.py"), tmp_path / "m.pth", tmp_path / "w", teachers,
                        view_kind="mixed", views=3, val_fold=-1, oof=False)
    with pytest.raises(ConfigError, match="^--no-oof: every teacher trained on every training image"):
        distill.main(argv)
    assert not (tmp_path / "m.pth").exists()


@pytest.mark.parametrize("cls,old,new", [(distill.DistillConfig, "--scratch", "--hard-labels"),
                                         (distill.DistillConfig, "--no-scratch", "--hard-labels"),
                                         (pipeline.PipelineConfig, "--scratch-control", "--hard-label-control")])
def test_an_old_spelling_is_a_one_line_hint(cls, old, new, tmp_path):
    with pytest.raises(ConfigError, match=rf"^{old.replace('no-', '')}: renamed {new} \(see --help\)$"):
        parse_config(cls, [old])
    path = tmp_path / "c.yaml"
    path.write_text(f"{old.replace('--no-', '').lstrip('-').replace('-', '_')}: true\n")
    with pytest.raises(ConfigError, match=rf"renamed {new[2:].replace('-', '_')}"):
        parse_config(cls, ["--config", str(path)])
