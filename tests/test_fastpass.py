"""Frozen passes through ONNX Runtime (toolkit/fastpass.py): the same outputs as torch, the graph
cached by its weights, the torch path with one log line where ONNX Runtime is missing, refuses a
model or disagrees with torch, and byte-identical results run after run."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from helpers_distill import ROOT, build_tiny_teacher, distill_argv, read_state, subprocess_env, tiny_world
from toolkit import fastpass
from toolkit.augment import sample_view_params
from toolkit.fastpass import OnnxRunner, frozen_runner
from toolkit.teachers import load_teacher
from toolkit.trunk import TrunkSplit, compute_trunk_features

pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch):
    """Each test starts as a new process would: no sessions in memory, no reason logged yet."""
    monkeypatch.setattr(fastpass, "_SESSIONS", type(fastpass._SESSIONS)())
    monkeypatch.setattr(fastpass, "_SAID", set())
    monkeypatch.delenv("TOOLKIT_FAST_PASSES", raising=False)


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 3, 1, 1, groups=8),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        net[1].running_mean.uniform_(-1, 1), net[1].running_var.uniform_(0.5, 2)
    return net.eval()


def fast_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("fast passes:")]


def test_runner_equals_torch_on_other_batches_and_caches_its_graph_by_the_weights(cache_dir, caplog):
    net, x = small_net(), torch.randn(21, 3, 16, 16)  # 21: not a multiple of the chunk
    with caplog.at_level(logging.INFO, logger="toolkit"):
        run = frozen_runner(net, x[:4], "small")
    assert isinstance(run, OnnxRunner)
    with torch.no_grad():
        assert torch.allclose(run(x), net(x), atol=1e-5)
        assert torch.allclose(run(x[:1]), net(x[:1]), atol=1e-5)
    graphs = sorted(cache_dir.glob("onnx-*.onnx"))
    assert len(graphs) == 1
    version = __import__("onnxruntime").__version__
    assert fast_lines(caplog) == [f"fast passes: frozen passes run in ONNX Runtime {version}"
                                  " (each model checked against torch on its first batch)"]
    # a new process (no session in memory) takes the cached graph: no second export
    fastpass._SESSIONS.clear()

    def no_export(*a, **k):
        raise AssertionError("exported again although the graph is cached")
    original = fastpass._export
    fastpass._export = no_export
    try:
        assert isinstance(frozen_runner(net, x[:4], "small"), OnnxRunner)
        # other weights are another graph: exported, never the stale one
        fastpass._export = original
        other = small_net(seed=1)
        run_other = frozen_runner(other, x[:4], "small")
        with torch.no_grad():
            assert torch.allclose(run_other(x), other(x), atol=1e-5)
    finally:
        fastpass._export = original
    assert len(sorted(cache_dir.glob("onnx-*.onnx"))) == 2


def test_a_corrupt_cached_graph_is_exported_again(cache_dir):
    net, x = small_net(), torch.randn(4, 3, 16, 16)
    frozen_runner(net, x, "small")
    (graph,) = cache_dir.glob("onnx-*.onnx")
    graph.write_bytes(b"not an onnx graph")
    fastpass._SESSIONS.clear()
    run = frozen_runner(net, x, "small")
    assert isinstance(run, OnnxRunner)
    with torch.no_grad():
        assert torch.allclose(run(x), net(x), atol=1e-5)
    assert graph.read_bytes() != b"not an onnx graph"


def test_without_onnxruntime_the_torch_module_runs_with_one_log_line(cache_dir, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    net, x = small_net(), torch.randn(4, 3, 16, 16)
    with caplog.at_level(logging.INFO, logger="toolkit"):
        assert frozen_runner(net, x, "a") is net
        assert frozen_runner(net, x, "b") is net
    assert fast_lines(caplog) == ["fast passes: onnxruntime is not installed; frozen passes run in torch"]
    assert not list(cache_dir.glob("onnx-*"))


def test_switched_off_or_off_the_cpu_runs_in_torch(cache_dir, monkeypatch, caplog):
    net, x = small_net(), torch.randn(4, 3, 16, 16)
    assert frozen_runner(net, x, "a", device="meta") is net  # another device: its own torch path, no line
    monkeypatch.setenv("TOOLKIT_FAST_PASSES", "0")
    with caplog.at_level(logging.INFO, logger="toolkit"):
        assert frozen_runner(net, x, "a") is net
    assert fast_lines(caplog) == ["fast passes: off (TOOLKIT_FAST_PASSES=0); frozen passes run in torch"]


class NotExportable(nn.Module):
    def forward(self, x):
        return torch.linalg.svdvals(x.flatten(2))  # no ONNX symbolic for this operator


def test_a_model_onnx_cannot_run_falls_back_with_one_line(cache_dir, caplog):
    net, x = NotExportable(), torch.randn(4, 3, 4, 4)
    fallback = object()
    with caplog.at_level(logging.INFO, logger="toolkit"):
        assert frozen_runner(net, x, "svd net") is net
        assert frozen_runner(net, x, "svd net", fallback=fallback) is fallback
    (line,) = fast_lines(caplog)
    assert line.startswith("fast passes: svd net: ONNX Runtime cannot run it (UnsupportedOperatorError: ")
    assert line.endswith("; this pass runs in torch") and "\n" not in line


def test_a_graph_that_disagrees_with_torch_falls_back(cache_dir, monkeypatch, caplog):
    net, x = small_net(), torch.randn(4, 3, 16, 16)
    monkeypatch.setattr(fastpass, "PARITY_TOLERANCE", -1.0)  # no difference passes
    with caplog.at_level(logging.INFO, logger="toolkit"):
        assert frozen_runner(net, x, "small") is net
    (line,) = fast_lines(caplog)
    assert line.startswith("fast passes: small: ONNX Runtime differs from torch by ")


def test_trunk_features_match_torch_and_are_the_same_bytes_run_after_run(cache_dir, monkeypatch):
    teacher = load_teacher(build_tiny_teacher(cache_dir.parent / "t", config={"frozen_stages": 2}))
    split = TrunkSplit(teacher.backbone, 2)
    images = torch.randint(0, 256, (19, 3, 100, 100), dtype=torch.uint8)
    views = sample_view_params(19, 3, 8, seed=0)
    fast = compute_trunk_features(teacher, split, images, views, batch_size=16)
    fastpass._SESSIONS.clear()
    assert torch.equal(fast, compute_trunk_features(teacher, split, images, views, batch_size=16))
    monkeypatch.setenv("TOOLKIT_FAST_PASSES", "0")
    eager = compute_trunk_features(teacher, split, images, views, batch_size=16)
    assert fast.shape == eager.shape and fast.dtype == torch.float16
    assert torch.allclose(fast.float(), eager.float(), atol=2e-2, rtol=1e-2)  # fp16 features


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with tiny_world(tmp_path_factory.mktemp("fastpass"), trunk_teacher=True) as world:
        yield world


def run_distill(world, tmp_path, name: str, hide_onnxruntime: bool = False) -> subprocess.CompletedProcess:
    """distill.py as a new process on the default (mixed-view) path, every frozen pass live: its own
    empty cache, the trunk teacher labelling, the student's first stage frozen."""
    argv = distill_argv(world.data, world.arch, tmp_path / name / "model.pth", tmp_path / name / "work",
                        [world.trunk], view_kind="mixed", views=4, epochs=1, student_frozen_stages=1, val_fold=0)
    hide = "sys.modules['onnxruntime'] = None; " if hide_onnxruntime else ""
    code = (f"import runpy, sys; {hide}sys.argv = ['distill.py'] + sys.argv[1:]; "
            f"runpy.run_path({str(ROOT / 'distill.py')!r}, run_name='__main__')")
    env = subprocess_env(tmp_path / name / "cache")
    env.update(OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_default_path_gives_the_same_bytes_twice_and_completes_without_onnxruntime(world, tmp_path):
    runs = {name: run_distill(world, tmp_path, name, hide_onnxruntime=name == "torch")
            for name in ("fast_a", "fast_b", "torch")}
    for name, run in runs.items():
        assert run.returncode == 0, f"{name}: {run.stderr[-2000:]}"
    lines = {name: [x for x in run.stdout.splitlines() if x.startswith("fast passes:")] for name, run in runs.items()}
    assert lines["torch"] == ["fast passes: onnxruntime is not installed; frozen passes run in torch"]
    assert len(lines["fast_a"]) == 1 and "ONNX Runtime" in lines["fast_a"][0]
    assert list((tmp_path / "fast_a" / "cache").glob("onnx-*.onnx"))
    assert not list((tmp_path / "torch" / "cache").glob("onnx-*.onnx"))
    states = {name: read_state(tmp_path / name / "model.pth") for name in runs}
    assert states["fast_a"].keys() == states["torch"].keys()
    assert all(torch.equal(states["fast_a"][k], states["fast_b"][k]) for k in states["fast_a"]), \
        "the same seed gave other bytes through the fast path"
