"""Reliability of distill.py (issue 7): non-finite losses, unwritable outputs, SIGKILL at any
point + exact resume, bit-for-bit reproducibility, degenerate class counts.

Tiny setting (see helpers_distill.py): 36 solid-colour JPEGs, three 1-epoch fold teachers on
timm's test_efficientnet, a narrow 3-class MyCNN. Torch runs single-threaded (in-process and
in the subprocesses: OMP_NUM_THREADS=1) so that in- and out-of-process floats agree.
(Data-cache staleness/corruption is covered by tests/test_data.py.)
"""
from __future__ import annotations

import json
import os
import runpy
import sys
from types import SimpleNamespace

import pytest
import torch

import distill
from helpers_distill import (ROOT, distill_argv, file_bytes, kill_runs_when_paused, make_course_folder, read_state,
                             start_paused_run, student_state, tiny_world, tmp_files, build_tiny_teacher,
                             write_arch)
from toolkit.engine import CHECKPOINT, NonFiniteLossError
from toolkit.io import atomic_save
from toolkit.student import exec_architecture, load_student


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with tiny_world(tmp_path_factory.mktemp("reliability")) as world:
        yield world


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def history(work) -> list[dict]:
    """log.json rows without wall-clock fields."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in json.loads((work / "log.json").read_text())]


# ----------------------------------------------------------------------------------------
# Non-finite loss
# ----------------------------------------------------------------------------------------
def check_kept_checkpoint(world, work, step):
    ckpt = torch.load(work / CHECKPOINT, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == step
    student = exec_architecture(world.arch)["model"]
    student.load_state_dict(ckpt["model"])  # strict: the kept checkpoint is a usable student
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    return ckpt


def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(world, shared_cache, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_kd = distill.kd_loss

    def poisoned_kd(*args, **kwargs):
        calls["n"] += 1
        out = real_kd(*args, **kwargs)
        if calls["n"] == 4:  # the 4th training step (global_step 3)
            out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(distill, "kd_loss", poisoned_kd)
    out, work = tmp_path / "out" / "model.pth", tmp_path / "work"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 2, step 3; "
                                                 r"the last good checkpoint is kept at .*checkpoint.pth"):
        distill.main(distill_argv(world.data, world.arch, out, work, world.teachers, epochs=3, checkpoint_every=1))
    check_kept_checkpoint(world, work, 3)
    assert not out.exists() and not out.with_suffix(".provenance.json").exists()
    assert tmp_files(work) == [] and tmp_files(out.parent) == []


def test_absurd_learning_rate_diverges_to_non_finite_error(world, shared_cache, tmp_path):
    out, work = tmp_path / "model.pth", tmp_path / "work"
    torch.save(student_state(world.arch), out)
    before = out.read_bytes()
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        distill.main(distill_argv(world.data, world.arch, out, work, world.teachers, lr=1e30, epochs=3,
                                  checkpoint_every=1))
    assert file_bytes(out) == before  # the previous model.pth is untouched
    ckpt = torch.load(work / CHECKPOINT, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] >= 1
    exec_architecture(world.arch)["model"].load_state_dict(ckpt["model"])


# ----------------------------------------------------------------------------------------
# Unwritable output folder
# ----------------------------------------------------------------------------------------
def deny_writes_to(monkeypatch, folder):
    """Make os.access report ``folder`` unwritable (as root, chmod does not stop writes)."""
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if os.path.realpath(path) == os.path.realpath(folder) and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)
    monkeypatch.setattr(os, "access", access)


def test_unwritable_output_folder_chmod(world, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: chmod 0o500 does not stop writes (see the os.access variant below)")
        with pytest.raises(PermissionError, match=f"{locked}: output folder is not writable"):
            distill.main(distill_argv(world.data, world.arch, locked / "model.pth", tmp_path / "work",
                                      hard_labels=True))
        assert not (locked / "model.pth").exists()
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("which", ["out", "work"])
def test_unwritable_output_folder_fails_before_training(world, tmp_path, monkeypatch, which):
    out_dir, work = tmp_path / "out", tmp_path / "work"
    out_dir.mkdir()
    torch.save(student_state(world.arch), out_dir / "model.pth")
    before = (out_dir / "model.pth").read_bytes()
    locked = out_dir if which == "out" else work
    locked.mkdir(exist_ok=True)
    deny_writes_to(monkeypatch, locked)
    with pytest.raises(PermissionError, match=f"{locked}: output folder is not writable"):
        distill.main(distill_argv(world.data, world.arch, out_dir / "model.pth", work, world.teachers))
    assert file_bytes(out_dir / "model.pth") == before
    assert not (work / "log.json").exists() and not (work / CHECKPOINT).exists()  # nothing was trained


def test_unwritable_output_folder_command_line_message(world, tmp_path, monkeypatch):
    """`python distill.py` turns it into one line 'error: <folder>: ...', no traceback."""
    locked = tmp_path / "locked"
    locked.mkdir()
    deny_writes_to(monkeypatch, locked)
    monkeypatch.setattr(sys, "argv", ["distill.py", *distill_argv(world.data, world.arch, locked / "model.pth",
                                                                  tmp_path / "work", hard_labels=True)])
    with pytest.raises(SystemExit, match=f"^error: {locked}: output folder is not writable$"):
        runpy.run_path(str(ROOT / "distill.py"), run_name="__main__")


def test_atomic_write_refuses_unwritable_folder_and_leaves_nothing(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    deny_writes_to(monkeypatch, locked)
    with pytest.raises(PermissionError, match=f"{locked}: output folder is not writable"):
        atomic_save({"w": torch.zeros(2)}, locked / "model.pth")
    assert list(locked.iterdir()) == []


def test_atomic_write_failure_midway_keeps_previous_file(tmp_path):
    path = tmp_path / "model.pth"
    atomic_save({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom while writing")
    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"w": torch.zeros(3), "x": Unpicklable()}, path)
    assert path.read_bytes() == before and tmp_files(tmp_path) == []


# ----------------------------------------------------------------------------------------
# SIGKILL at any point, then --resume == an uninterrupted run
# ----------------------------------------------------------------------------------------
# 24 train images / batch 8 = 3 steps per epoch, 3 epochs: global steps 0..8; a checkpoint
# after every step (and at every epoch end).
KILL_FLAGS = dict(epochs=3, checkpoint_every=1)
KILL_POINTS = {
    "during_targets": "targets:2",                 # 2nd teacher's soft targets: no checkpoint yet
    "early_mid_checkpoint_write": "replace:checkpoint.pth:3",  # writing step 3's checkpoint
    "late_training": "step:8",                     # before the last step
    "mid_model_write": "replace:model.pth:1",      # model.pth's temp file complete, not renamed
}
KEPT_STEP = {"during_targets": None, "early_mid_checkpoint_write": 2, "late_training": 8, "mid_model_write": 9}


@pytest.fixture(scope="module")
def killed_runs(world):
    """All kill scenarios at once (their start-up overlaps): each has a sentinel model.pth,
    runs in a subprocess until its point, and is SIGKILLed there."""
    runs = {}
    for name, point in KILL_POINTS.items():
        tmp = world.root / "kill" / name
        out, work = tmp / "out" / "model.pth", tmp / "work"
        out.parent.mkdir(parents=True)
        sentinel = student_state(world.arch, seed=7)
        torch.save(sentinel, out)
        argv = distill_argv(world.data, world.arch, out, work, world.teachers, **KILL_FLAGS)
        proc, marker = start_paused_run(tmp, point, argv, world.cache)
        runs[name] = SimpleNamespace(proc=proc, marker=marker, out=out, work=work, argv=argv,
                                     sentinel=sentinel, sentinel_bytes=out.read_bytes())
    kill_runs_when_paused(list(runs.values()))
    return runs


@pytest.fixture(scope="module")
def reference_run(world):
    """The same run, uninterrupted, in-process."""
    tmp = world.root / "reference"
    out, work = tmp / "out" / "model.pth", tmp / "work"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOOLKIT_CACHE", str(world.cache))
        prov = distill.main(distill_argv(world.data, world.arch, out, work, world.teachers, **KILL_FLAGS))
    return SimpleNamespace(out=out, work=work, prov=prov, state=read_state(out), history=history(work))


@pytest.mark.parametrize("name", list(KILL_POINTS))
def test_sigkill_leaves_previous_model_and_resume_matches_uninterrupted(
        world, shared_cache, killed_runs, reference_run, name):
    run = killed_runs[name]
    # model.pth is the previous complete file, byte for byte, and still a valid student
    assert file_bytes(run.out) == run.sentinel_bytes
    assert same_state(read_state(run.out), run.sentinel)
    load_student(world.arch, run.out)
    assert not run.out.with_suffix(".provenance.json").exists()
    leftovers = tmp_files(run.out.parent)
    if name == "mid_model_write":
        # SIGKILL cannot be cleaned up after: the dead writer's complete-but-unpublished temp
        # file stays (hidden, *.tmp is git-ignored); model.pth itself is never partial.
        assert len(leftovers) == 1 and leftovers[0].startswith(".model.pth.")
    else:
        assert leftovers == []
    # the work dir's checkpoint is the last complete one
    if KEPT_STEP[name] is None:
        assert not (run.work / CHECKPOINT).exists()
    else:
        check_kept_checkpoint(world, run.work, KEPT_STEP[name])

    # --resume finishes the run exactly as if it had never been interrupted
    prov = distill.main(run.argv + ["--resume"])
    assert prov["student_val"] == reference_run.prov["student_val"]
    assert prov["ensemble"] | {"target_seconds": 0} == reference_run.prov["ensemble"] | {"target_seconds": 0}
    assert history(run.work) == reference_run.history
    assert same_state(read_state(run.out), reference_run.state)
    # no temp file is left: the resumed run's own are renamed, and writing model.pth again removed
    # the dead writer's (its pid is in the name, and that process is gone)
    assert tmp_files(run.out.parent) == [] and tmp_files(run.work) == []


# ----------------------------------------------------------------------------------------
# Reproducibility
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [dict(), dict(view_kind="shift"), dict(mode="online", view_kind="shift", mixup=0.2),
                                   dict(hard_labels=True)],
                         ids=["mixed", "shift", "online-mixup", "hard-labels"])
def test_same_seed_gives_identical_student(world, shared_cache, tmp_path, flags):
    states, provs = [], []
    for i in range(2):
        out = tmp_path / f"run{i}" / "model.pth"
        provs.append(distill.main(distill_argv(world.data, world.arch, out, tmp_path / f"work{i}",
                                               () if flags.get("hard_labels") else world.teachers, epochs=2, **flags)))
        states.append(read_state(out))
    assert same_state(*states), "same seed on CPU gave different weights"
    assert provs[0]["student_val"] == provs[1]["student_val"]
    assert history(tmp_path / "work0") == history(tmp_path / "work1")


def test_different_seed_gives_different_student(world, shared_cache, tmp_path):
    states = []
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}" / "model.pth"
        distill.main(distill_argv(world.data, world.arch, out, tmp_path / f"work{seed}", hard_labels=True,
                                  epochs=1, seed=seed))
        states.append(read_state(out))
    assert not same_state(*states)


# ----------------------------------------------------------------------------------------
# Degenerate class counts
# ----------------------------------------------------------------------------------------
def test_class_with_a_single_image_scratch(world, tmp_path):
    data = make_course_folder(tmp_path / "data", counts={"book": 10, "car": 1, "cat": 10})
    out = tmp_path / "model.pth"
    prov = distill.main(distill_argv(data, world.arch, out, tmp_path / "work", hard_labels=True, epochs=2))
    assert prov["classes"] == ["book", "car", "cat"]
    load_student(world.arch, out)


@pytest.mark.parametrize("val_fold", [0, 1, 2, -1])
def test_single_image_class_and_empty_class_with_teachers(world, tmp_path, val_fold):
    """Teachers know 4 classes; the data has one 'car' image and no 'dog' at all. Whichever
    fold holds the lone image (or none, val_fold -1), split, sampler and targets cope."""
    classes = ("book", "car", "cat", "dog")
    data = make_course_folder(tmp_path / "data", counts={"book": 8, "car": 1, "cat": 8})
    teachers = [build_tiny_teacher(tmp_path / f"t{f}", classes=classes, config={"fold": f, "folds": 3}, seed=f)
                for f in range(3)]
    arch4 = write_arch(tmp_path / "arch4.py", num_classes=4)
    out = tmp_path / "model.pth"
    prov = distill.main(distill_argv(data, arch4, out, tmp_path / "work", teachers, epochs=1, val_fold=val_fold,
                                     batch_size=4))
    assert prov["classes"] == list(classes)
    load_student(arch4, out)
    if val_fold == -1:
        assert prov["student_val"] == {} and prov["val_images"] == 0
