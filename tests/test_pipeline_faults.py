"""The pipeline survives its machine: SIGKILL at every stage, then the same command again ->
the stage is resumed or reused and model.pth is byte-identical to an uninterrupted run; a full
disk or a read-only folder mid-run, a decompression bomb or a truncated JPEG in the data, a
cache corrupted between runs: one line, previous outputs intact, no temp file left; a second
run on the same folders is refused while the first holds them, and the first finishes unharmed.

Tiny setting: 24 solid-colour JPEGs (3 classes), a recipe of two fold teachers on timm's
``test_efficientnet`` (32 px, frozen trunk cached for 2 views, 2 epochs) and a narrow student
(2 epochs), checkpoints after every step. Torch is single-threaded in- and out-of-process
(OMP_NUM_THREADS=1), so the killed subprocesses and the in-process runs compute the same floats.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import pipeline
from helpers import assert_one_line_error
import helpers_distill
from helpers_distill import (ROOT, kill_runs_when_paused, make_course_folder, one_thread_with_cache, start_paused_run,
                             write_arch)
from toolkit.cli import run_main
from toolkit.locks import RunLockedError, hold_locks, lock_path

# Kill points: helpers_distill.KILL_WRAPPER.
# point -> the status line the second run must print for the stage that was interrupted
KILLS = {
    "decode": ("decode", "=== teacher test_efficientnet_32px fold 0: trained"),
    "trunk_cache_write": ("replace:trunk-*.pt:1", "=== teacher test_efficientnet_32px fold 0: trained"),
    "first_teacher_mid_training": ("step:teacher test_efficientnet_32px_f0:3",
                                   "fold 0: resumed from its checkpoint (epoch 2, step 3)"),
    "second_teacher_mid_training": ("step:teacher test_efficientnet_32px_f1:2",
                                    "fold 1: resumed from its checkpoint (epoch 2, step 2)"),
    "teacher_pth_write": ("replace:teacher.pth:1", "fold 0: resumed from its checkpoint (epoch 3, step 4)"),
    "soft_targets": ("targets:2", "=== distil student: trained"),
    "student_mid_training": ("step:student:4", "=== distil student: resumed from its checkpoint (epoch 2, step 4)"),
    "model_pth_write": ("replace:model.pth:1", "=== distil student: resumed from its checkpoint (epoch 3, step 6)"),
    "report": ("report", "=== distil student: reused (finished earlier)"),
}


SENTINEL = b"a previous model.pth"


def tiny_recipe(root: Path) -> Path:
    arch = write_arch(root / "arch.py")
    recipe = {
        "folds": 2, "views": 2, "teacher_split": "folds",  # two fold teachers: a kill between them
        "teachers": ["test_efficientnet@32"],
        "teacher": {"pretrained": "none", "epochs": 2, "batch_size": 8, "frozen_stages": 2, "warmup_epochs": 0.5,
                    "ema_decay": 0.9, "checkpoint_every": 1, "device": "cpu", "trivial_augment": False},
        "student": {"epochs": 2, "batch_size": 8, "lr": 0.3, "warmup_epochs": 0.5, "student_init": "none",
                    "student_frozen_stages": 0, "arch": str(arch), "checkpoint_every": 1, "device": "cpu",
                    "view_kind": "shift"},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def pipeline_argv(world, run: Path, report: bool = False) -> list[str]:
    return ["--data", str(world.data), "--recipe", str(world.recipe), "--teachers-root", str(run / "teachers"),
            "--out", str(run / "model.pth"), "--work-dir", str(run / "work"), "--report-dir", str(run / "report"),
            *([] if report else ["--no-report"])]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline-faults")
    with one_thread_with_cache(root / "unused-cache"):
        data = make_course_folder(root / "data", counts={"book": 8, "car": 8, "cat": 8})
        yield SimpleNamespace(root=root, data=data, recipe=tiny_recipe(root))


def start_paused(world, name: str, point: str, argv: list[str], cache: Path):
    folder = world.root / "kills" / name
    proc, marker = start_paused_run(folder, point, argv, cache, script="pipeline.py")
    return SimpleNamespace(proc=proc, marker=marker, folder=folder)


def wait_paused(run, timeout: float = 240.0) -> None:
    helpers_distill.wait_paused(run.proc, run.marker, timeout)


def run_in_process(argv: list[str], cache: Path, capsys) -> str:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOOLKIT_CACHE", str(cache))
        capsys.readouterr()
        pipeline.main(argv)
    return capsys.readouterr().out


def temp_files(*folders: Path) -> list[str]:
    return sorted(str(p) for folder in folders if folder.exists() for p in folder.rglob("*.tmp"))


@pytest.fixture(scope="module")
def reference(world):
    """The uninterrupted run, in-process, with its own cache."""
    run = world.root / "reference"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOOLKIT_CACHE", str(run / "cache"))
        pipeline.main(pipeline_argv(world, run, report=True))
    return SimpleNamespace(model=(run / "model.pth").read_bytes(), run=run, teachers=teacher_weights(run / "teachers"))


def teacher_weights(root: Path) -> dict[str, bytes]:
    """Each teacher's weights as bytes (teacher.pth also records its training seconds)."""
    from helpers_distill import serialise
    return {p.parent.name: serialise(torch.load(p, weights_only=False)["state_dict"])
            for p in root.rglob("teacher.pth")}


def kill_at_points(world, kills: dict, report=()) -> dict:
    """Every kill case of ``kills`` at once (their start-ups overlap), each in its own folders and
    cache, SIGKILLed at its point; ``report``: the cases that run the report too."""
    runs = {}
    try:
        for name, (point, _) in kills.items():
            run = world.root / "runs" / name
            run.mkdir(parents=True)
            (run / "model.pth").write_bytes(SENTINEL)  # a previous model: replaced only by a finished student
            argv = pipeline_argv(world, run, report=name in report)
            runs[name] = start_paused(world, name, point, argv, run / "cache")
            runs[name].argv, runs[name].run = argv, run
    finally:
        kill_runs_when_paused(list(runs.values()))
    return runs


@pytest.fixture(scope="module")
def killed(world):
    return kill_at_points(world, KILLS, report={"report"})


@pytest.mark.parametrize("name", list(KILLS))
def test_sigkill_at_every_stage_then_the_same_command_finishes_the_same_model(world, reference, killed, name, capsys):
    run = killed[name]
    # the kill left the previous model.pth as it was (the report runs after the new one is written)
    assert ((run.run / "model.pth").read_bytes() == SENTINEL) == (name != "report")
    out = run_in_process(run.argv, run.run / "cache", capsys)
    assert KILLS[name][1] in out and "Traceback" not in out, out
    assert (run.run / "model.pth").read_bytes() == reference.model
    assert teacher_weights(run.run / "teachers") == reference.teachers
    # nothing half-written is left: the dead writer's temp file was removed when the file was written again
    assert temp_files(run.run) == []
    assert not list(run.run.rglob("checkpoint.pth"))  # finished teachers and students keep no training state
    assert not list(run.run.rglob(".lock")) and not list(run.run.rglob(".*.lock"))
    if name == "report":
        assert (run.run / "report" / "report.md").is_file()


def test_a_finished_pipeline_run_again_reuses_every_stage(world, reference, capsys):
    out = run_in_process(pipeline_argv(world, reference.run), reference.run / "cache", capsys)
    assert out.count(": reused (finished earlier)") == 3, out  # 2 teachers + the student
    assert (reference.run / "model.pth").read_bytes() == reference.model


# ----------------------------------------------------------------------------------------
# The default recipe's shape: one teacher of every image, the student on mixed views
# ----------------------------------------------------------------------------------------
# point -> the status line the second run prints for the interrupted stage
KILLS_MIXED = {
    "teacher_mid_training": ("step:teacher test_efficientnet_32px_all:3",
                             "=== teacher test_efficientnet_32px all images: resumed from its checkpoint"),
    "mixed_view_labels": ("replace:view-labels-*:2", "=== distil student: trained"),
    "student_mid_training": ("step:student:4", "=== distil student: resumed from its checkpoint"),
}


@pytest.fixture(scope="module")
def mixed_world(world):
    """The tiny recipe as the default recipe has it: teacher_split all, the student on the
    image, its mirror and 2 mixed views, each labelled once (view-labels-* caches)."""
    recipe = yaml.safe_load(world.recipe.read_text())
    recipe["teacher_split"] = "all"
    recipe["student"].update(view_kind="mixed", views=4)
    path = world.root / "mixed-recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    mixed = SimpleNamespace(root=world.root / "mixed", data=world.data, recipe=path)
    run = mixed.root / "reference"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOOLKIT_CACHE", str(run / "cache"))
        pipeline.main(pipeline_argv(mixed, run))
    mixed.model, mixed.teachers = (run / "model.pth").read_bytes(), teacher_weights(run / "teachers")
    assert list(mixed.teachers) == ["test_efficientnet_32px_all"] and list((run / "cache").glob("view-labels-*"))
    return mixed


@pytest.fixture(scope="module")
def killed_mixed(mixed_world):
    return kill_at_points(mixed_world, KILLS_MIXED)


@pytest.mark.parametrize("name", list(KILLS_MIXED))
def test_the_default_recipes_shape_killed_then_run_again_finishes_the_same_model(mixed_world, killed_mixed, name,
                                                                                 capsys):
    run = killed_mixed[name]
    assert (run.run / "model.pth").read_bytes() == SENTINEL
    out = run_in_process(run.argv, run.run / "cache", capsys)
    assert KILLS_MIXED[name][1] in out and "Traceback" not in out, out
    assert (run.run / "model.pth").read_bytes() == mixed_world.model
    assert teacher_weights(run.run / "teachers") == mixed_world.teachers
    assert temp_files(run.run) == [] and not list(run.run.rglob("checkpoint.pth"))


# ----------------------------------------------------------------------------------------
# A second run on the same folders
# ----------------------------------------------------------------------------------------
def test_a_second_run_is_refused_and_the_first_finishes_unharmed(world, reference, capsys):
    run = world.root / "concurrent"
    argv = pipeline_argv(world, run)
    first = start_paused(world, "concurrent", "step:student:2", argv, run / "cache")
    try:
        wait_paused(first)
        with pytest.raises(SystemExit) as exc:
            run_main(pipeline.main, argv)
        assert_one_line_error(exc.value, "in use by a running run", f"pid {first.proc.pid}")
        # distill.py and train_teacher.py on its folders are refused too
        import distill
        import train_teacher
        with pytest.raises(RunLockedError, match=f"pid {first.proc.pid}"):
            distill.main(["--data", str(world.data), "--recipe", str(world.recipe), "--out", str(run / "model.pth"),
                          "--work-dir", str(run / "other-work"), "--teachers-root", str(run / "teachers"),
                          "--hard-labels"])
        Path(str(first.marker) + ".go").write_text("")
        assert first.proc.wait(timeout=240) == 0, (first.folder / "run.log").read_text()[-3000:]
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    assert (run / "model.pth").read_bytes() == reference.model
    del train_teacher


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path):
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-c", "import os, sys; sys.path.insert(0, sys.argv[1]);"
                           "from toolkit.locks import hold_locks\nwith hold_locks(folders=[sys.argv[2]]): os._exit(0)",
                           str(ROOT), str(work)], timeout=60)
    assert proc.returncode == 0 and lock_path(work, True).is_file()  # left behind: its holder never released it
    with hold_locks(folders=[work]):
        assert str(os.getpid()) in lock_path(work, True).read_text()
    assert not lock_path(work, True).exists()


# ----------------------------------------------------------------------------------------
# Faults while writing: a full disk, a folder turned read-only
# ----------------------------------------------------------------------------------------
def failing_fsync(pattern: str, code: int):
    """os.fsync that fails with ``code`` for temp files of names matching ``pattern``."""
    import fnmatch
    real = os.fsync

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if fnmatch.fnmatch(Path(name).name, pattern):
            raise OSError(code, os.strerror(code))
        return real(fd)
    return fsync


@pytest.mark.parametrize("target, code, stage", [
    (".checkpoint.pth.*.tmp", errno.ENOSPC, "a teacher's checkpoint"),
    (".model.pth.*.tmp", errno.ENOSPC, "model.pth"),
    (".teacher.pth.*.tmp", errno.EROFS, "teacher.pth on a folder turned read-only"),
])
def test_a_write_that_fails_ends_the_run_with_one_line_and_keeps_the_previous_file(
        world, reference, tmp_path, monkeypatch, target, code, stage):
    run = tmp_path / "run"
    (run / "teachers").mkdir(parents=True)
    (run / "model.pth").write_bytes(b"previous model")
    monkeypatch.setenv("TOOLKIT_CACHE", str(reference.run / "cache"))  # trunk caches complete: faster
    monkeypatch.setattr(os, "fsync", failing_fsync(target, code))
    with pytest.raises(SystemExit) as exc:
        run_main(pipeline.main, pipeline_argv(world, run))
    message = assert_one_line_error(exc.value)
    assert os.strerror(code).lower() in message and "previous file" in message, message
    written = target.split(".")[1] + "." + target.split(".")[2]  # the file named, not the temp file
    assert f"{written}: " in message, message
    assert (run / "model.pth").read_bytes() == b"previous model"
    assert temp_files(run) == []
    assert not list(run.rglob(".lock"))


def test_a_cache_that_cannot_be_written_costs_time_not_the_run(world, reference, tmp_path, monkeypatch, caplog):
    """A full disk while writing a trunk cache: one warning, the features are used from memory,
    the run finishes, and no temp file is left in the cache. (Not the same bytes: without the
    teachers' trunk file, the soft-target pass computes those features in other batches, and
    oneDNN's kernels for another batch size round differently.)"""
    run, cache = tmp_path / "run", tmp_path / "cache"
    monkeypatch.setenv("TOOLKIT_CACHE", str(cache))
    monkeypatch.setattr(os, "fsync", failing_fsync(".trunk-*.tmp", errno.ENOSPC))
    pipeline.main(pipeline_argv(world, run))
    warnings = [r.getMessage() for r in caplog.records if "trunk cache not written" in r.getMessage()]
    assert warnings and "no space left on device" in warnings[0].lower()
    from toolkit.student import load_student
    load_student(world.root / "arch.py", run / "model.pth")  # a complete, valid student
    assert temp_files(cache, run) == [] and not list(cache.glob("trunk-*.pt"))


# ----------------------------------------------------------------------------------------
# Bad data mid-folder, caches corrupted between runs
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "bomb"])
def test_a_broken_image_in_the_middle_stops_the_pipeline_before_any_work(world, tmp_path, monkeypatch, damage):
    data = make_course_folder(tmp_path / "data", counts={"book": 8, "car": 8, "cat": 8})
    victim = data / "0011.jpg"
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:300])
    else:  # a tiny file that decodes to a huge image: PIL's decompression-bomb guard
        from PIL import Image
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    argv = pipeline_argv(world, run)
    argv[argv.index("--data") + 1] = str(data)
    with pytest.raises(SystemExit) as exc:
        run_main(pipeline.main, argv)
    message = assert_one_line_error(exc.value, "not a readable image")
    assert "0011.jpg" in message if damage == "truncated" else ".jpg" in message
    assert not (run / "teachers").exists() or not any((run / "teachers").iterdir())
    assert not (run / "model.pth").exists()


def test_caches_corrupted_between_runs_are_rebuilt_with_the_same_result(world, reference, tmp_path, capsys):
    cache = tmp_path / "cache"
    import shutil
    shutil.copytree(reference.run / "cache", cache)
    damaged = sorted(cache.glob("*.pt"))
    assert any(p.name.startswith("trunk-") for p in damaged) and len(damaged) >= 2  # data + trunk caches
    for p in damaged:
        p.write_bytes(p.read_bytes()[:100])
    run = tmp_path / "run"
    run_in_process(pipeline_argv(world, run), cache, capsys)
    assert (run / "model.pth").read_bytes() == reference.model
    assert all(torch.load(p, weights_only=True) is not None for p in damaged)  # rewritten whole
