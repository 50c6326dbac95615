"""Shared builders for the distillation tests (tests/test_distill.py, tests/test_reliability.py).

Everything is tiny so that end-to-end runs take seconds on a loaded 2-core CPU:
  * a course folder of small solid-colour JPEGs (classes differ by colour, so a model learns);
  * a student architecture file: architecture.py itself with its last line replaced by a
    narrow 3-class MyCNN (``--arch`` of distill.py);
  * teachers on timm's ``test_efficientnet`` (100k parameters) at 32x32 input, either built
    directly (random weights, any fold config) or trained for one epoch by train_teacher.py.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import build_course, colour_and_square, per_class

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLASSES = ("book", "car", "cat")
COLOURS = {"book": (200, 40, 40), "car": (40, 190, 40), "cat": (40, 40, 210), "dog": (200, 200, 40)}
TINY_TEACHER = "test_efficientnet"
TINY_SIZE = 32


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------
def make_course_folder(folder: Path, counts: dict[str, int] | None = None, size: tuple[int, int] = (60, 48),
                       seed: int = 0) -> Path:
    """A course folder (tests/helpers.py build_course): ``0000.jpg``... + labels.csv. ``counts``:
    images per class (default 12 each of book/car/cat). Each class has its own colour plus noise,
    and a bright square at a random place, so classes are separable but images differ."""
    counts = counts if counts is not None else {c: 12 for c in CLASSES}
    return build_course(folder, per_class(counts), colour_and_square(COLOURS, size, seed), name="{:04d}.jpg", first=0,
                        quality=95, exist_ok=True)


# ----------------------------------------------------------------------------------------
# Student
# ----------------------------------------------------------------------------------------
def write_arch(path: Path, num_classes: int = 3, widths: tuple = (8, 16, 16, 16)) -> Path:
    """architecture.py with ``model = MyCNN(...)`` replaced by a narrow ``num_classes`` model:
    a depthwise-separable stage of widths[0] channels, then one inverted-residual stage
    (stride 2, expansion 2) per further width, run at the input's own size (input_size=None,
    so tiny tests stay tiny)."""
    stages = [("ds", 3, 1, 1, widths[0], 1)] + [("ir", 3, 2, 2, w, 1) for w in widths[1:]]
    text = (ROOT / "architecture.py").read_text()
    new, n = re.subn(r"^model = MyCNN\(.*\)\s*$",
                     f"model = MyCNN(num_classes={num_classes}, stages={tuple(stages)}, stem_width={widths[0]}, "
                     f"head_width={2 * widths[-1]}, input_size=None)", text, flags=re.M)
    assert n == 1, "architecture.py no longer ends with 'model = MyCNN(...)'"
    path = Path(path)
    path.write_text(new)
    return path


def student_state(arch: Path, seed: int = 123) -> dict:
    """A complete, valid state_dict for ``arch`` (e.g. a sentinel model.pth)."""
    from toolkit.student import exec_architecture
    torch.manual_seed(seed)
    return exec_architecture(arch)["model"].state_dict()


def file_bytes(path: Path) -> bytes | None:
    path = Path(path)
    return path.read_bytes() if path.exists() else None


def tmp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp")) if Path(folder).is_dir() else []


# ----------------------------------------------------------------------------------------
# Teachers
# ----------------------------------------------------------------------------------------
def build_tiny_teacher(folder: Path, classes=CLASSES, config: dict | None = None, seed: int = 0,
                       mode: str = "rgb") -> Path:
    """A random-weight tiny teacher saved with save_teacher. ``config`` is what load_teacher /
    teacher_saw / oof_teacher_mask read (fold, folds, exclude_folds, seed, ...)."""
    from toolkit.teachers import build_teacher, save_teacher
    torch.manual_seed(seed)
    teacher = build_teacher(TINY_TEACHER, list(classes), mode, TINY_SIZE, pretrained="none")
    config = {"fold": -1, "folds": 3, "exclude_folds": [], "seed": 0, **(config or {})}
    save_teacher(folder, teacher, config, {"val_acc": None}, "none")
    return Path(folder)


def train_tiny_teacher(data: Path, out: Path, fold: int = 0, folds: int = 3, seed: int = 0, views: int = 2,
                       max_shift: int = 8, frozen_stages: int = 0, extra: list[str] | None = None) -> Path:
    """One epoch of train_teacher.py on ``test_efficientnet`` (needs TOOLKIT_CACHE set).
    ``frozen_stages`` > 0 trains on the cached frozen-trunk features of ``views`` views."""
    import train_teacher
    argv = ["--data", str(data), "--out", str(out), "--model", TINY_TEACHER, "--pretrained", "none",
            "--input-size", str(TINY_SIZE), "--epochs", "1", "--batch-size", "16", "--folds", str(folds),
            "--fold", str(fold), "--seed", str(seed), "--max-shift", str(max_shift),
            "--frozen-stages", str(frozen_stages), "--checkpoint-every", "0", "--device", "cpu"]
    if frozen_stages == 0:
        argv.append("--no-trunk-cache")
    else:  # the cached views (online, a teacher is refused --views: it has none)
        argv += ["--views", str(views)]
    train_teacher.main(argv + (extra or []))
    return Path(out)


def distill_argv(data: Path, arch: Path, out: Path, work: Path, teachers=(), **flags) -> list[str]:
    """distill.py flags for a tiny run; keyword flags override (``views=2`` -> ``--views 2``,
    True -> ``--flag``, False -> ``--no-flag``). The views are distill.py's default kind (the
    mixed views that ship), so every test exercises the default path unless it names
    ``view_kind='shift'``."""
    base = {"views": 2, "epochs": 2, "batch_size": 8, "folds": 3, "val_fold": 0, "device": "cpu",
            "checkpoint_every": 0, "lr": 0.3, "warmup_epochs": 0.5,
            "student_init": "none", "student_frozen_stages": 0}
    if flags.get("mode") == "online" and not flags.get("hard_labels"):  # no stored views: their options are refused
        for key in ("views", "student_frozen_stages"):
            base.pop(key)
    base.update(flags)
    argv = ["--data", str(data), "--arch", str(arch), "--out", str(out), "--work-dir", str(work)]
    if teachers:
        argv += ["--teachers", *map(str, teachers)]
    for key, value in base.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def subprocess_env(cache: Path) -> dict:
    env = dict(os.environ, TOOLKIT_CACHE=str(cache), PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def read_state(path: Path) -> dict:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(blob, dict) and all(torch.is_tensor(v) for v in blob.values())
    return blob


def serialise(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# Runs a script (distill.py or pipeline.py) as __main__ with one hook: at the chosen point it
# writes its pid to a marker file and waits (until a '<marker>.go' file appears, if ever); the
# test SIGKILLs it there (or lets it go on). Points:
#   decode                 while decoding the JPEGs (before the data cache is written)
#   replace:GLOB:J         inside the J-th atomic write of a file whose name matches GLOB, temp
#                          file complete, before the rename (os.replace) that publishes it
#   step:S, step:DESC:S    before training step S (global_step == S) of any run, or of the run
#                          whose progress label starts with DESC
#   targets:M              the M-th call labelling views with one teacher (shift or mixed views;
#                          before any checkpoint)
#   report                 when the evaluation report starts
KILL_WRAPPER = r'''
import fnmatch, os, signal, sys, time, runpy
from pathlib import Path
# A run started from a non-interactive shell's background job (`cmd &`, as CI scripts may do)
# inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler: restore it, as
# an interactive terminal would have it, so the Ctrl-C tests send a signal the run can see.
signal.signal(signal.SIGINT, signal.default_int_handler)
root, script, marker, point = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4].split(":")
sys.path.insert(0, root)
counts = {}

def pause():
    marker.write_text(str(os.getpid()))
    go = Path(str(marker) + ".go")
    while not go.exists():
        time.sleep(0.05)

def pause_in(owner, name, when=lambda *a, **k: True):
    """Replace owner.name by a wrapper that pauses first whenever when(*args) holds."""
    real = getattr(owner, name)
    def hooked(*a, **k):
        if when(*a, **k):
            pause()
        return real(*a, **k)
    setattr(owner, name, hooked)

def nth(key, n):
    counts[key] = counts.get(key, 0) + 1
    return counts[key] == n

if point[0] == "decode":
    import toolkit.data as D
    pause_in(D, "decode_folder")
elif point[0] == "replace":
    pause_in(os, "replace", lambda src, dst, *a, **k: fnmatch.fnmatch(Path(dst).name, point[1])
             and nth("r", int(point[2])))
elif point[0] == "step":
    import toolkit.engine as E
    desc, step = (point[1], int(point[2])) if len(point) == 3 else ("", int(point[1]))
    pause_in(E.Trainer, "train_step", lambda self, *a, **k: self.desc.startswith(desc) and self.global_step == step)
elif point[0] == "targets":  # either path's per-teacher labelling: shift views, or mixed views
    import toolkit.ensemble as T, toolkit.mixviews as M
    pause_in(T, "teacher_view_logits", lambda *a, **k: nth("t", int(point[1])))
    pause_in(M, "teacher_mixed_logits", lambda *a, **k: nth("t", int(point[1])))
elif point[0] == "report":
    import toolkit.evaluate as V
    pause_in(V, "main")
else:
    raise SystemExit(f"unknown kill point {point}")
sys.argv = [os.path.join(root, script), *sys.argv[5:]]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def start_paused_run(tmp: Path, point: str, argv: list[str], cache: Path, script: str = "distill.py"):
    """Start ``script argv`` in a subprocess that blocks at ``point``; returns (proc, marker)."""
    import subprocess
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    wrapper, marker = tmp / "kill_wrapper.py", tmp / "paused"
    wrapper.write_text(KILL_WRAPPER)
    env = subprocess_env(cache)
    env["OMP_NUM_THREADS"] = "1"  # as the in-process runs (torch.set_num_threads(1)): same floats
    log = open(tmp / "run.log", "w")
    proc = subprocess.Popen([sys.executable, str(wrapper), str(ROOT), script, str(marker), point, *argv],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, marker


def wait_paused(proc, marker: Path, timeout: float = 240.0) -> None:
    """Wait until the run reports it reached its point (its log in the failure if it ended first)."""
    import time
    deadline = time.time() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            log = (marker.parent / "run.log").read_text()[-3000:]
            raise AssertionError(f"run ended (rc={proc.returncode}) before its point:\n{log}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("run did not reach its point in time")
        time.sleep(0.05)


def kill_when_paused(proc, marker: Path, timeout: float = 240.0) -> None:
    """Wait until the run reports it reached its point, then SIGKILL it."""
    import signal
    wait_paused(proc, marker, timeout)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def kill_runs_when_paused(runs) -> None:
    """SIGKILL each run (``.proc``, ``.marker``) once it reaches its point; if anything fails on
    the way, no run is left alive."""
    try:
        for run in runs:
            kill_when_paused(run.proc, run.marker)
    finally:
        for run in runs:
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()


@contextlib.contextmanager
def one_thread_with_cache(cache: Path):
    """torch single-threaded (the same floats in-process and in subprocesses) and TOOLKIT_CACHE
    set to ``cache`` while a module's fixture builds and uses its world."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TOOLKIT_CACHE", str(cache))
            yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def tiny_world(root: Path, trunk_teacher: bool = False):
    """A data folder, a 3-class student arch and three fold teachers (folds=3) under ``root``,
    sharing one cache folder; torch single-threaded meanwhile. With ``trunk_teacher``, also one
    teacher trained on its cached frozen trunk (2 views, max_shift 8, seed 0)."""
    with one_thread_with_cache(root / "cache"):
        data = make_course_folder(root / "data")
        arch = write_arch(root / "arch.py")
        teachers = [train_tiny_teacher(data, root / "teachers" / f"fold{f}", fold=f, folds=3) for f in range(3)]
        trunk = (train_tiny_teacher(data, root / "trunk_teachers" / "fold1", fold=1, folds=3, frozen_stages=2)
                 if trunk_teacher else None)
        yield SimpleNamespace(root=root, cache=root / "cache", data=data, arch=arch, teachers=teachers,
                              trunk=trunk)
