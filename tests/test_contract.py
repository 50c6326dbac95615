"""The student as the grading server runs it: architecture.py exec'd in a fresh namespace with
only torch and the standard library importable, model.pth loaded strictly on the CPU.

The import guard here is written independently of toolkit.student; toolkit.student's own
guard and loader are tested at the end.
"""
from __future__ import annotations

import builtins
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, server_grey
from toolkit.student import ContractError, exec_architecture, load_student

REPO = Path(__file__).resolve().parents[1]
ARCH = REPO / "architecture.py"
WEIGHTS = REPO / "model.pth"
MAX_WEIGHTS_BYTES = 20 * 10**6   # 20 MB, counted conservatively
MAX_RSS_BYTES = 2 * 1024**3      # 2 GB peak for the whole-test-set forward pass


def server_namespace(source: str, filename: str = "architecture.py") -> dict:
    """exec ``source`` in a fresh namespace whose imports are limited to torch + stdlib."""
    real_import = builtins.__import__

    def only_torch_and_stdlib(name, globals=None, locals=None, fromlist=(), level=0):
        top = name.partition(".")[0]
        if level == 0 and top != "torch" and top not in sys.stdlib_module_names:
            raise ImportError(f"the grading server has no {name!r}")
        return real_import(name, globals, locals, fromlist, level)

    namespace = {"__builtins__": {**vars(builtins), "__import__": only_torch_and_stdlib},
                 "__name__": "__main__"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def server():
    """(namespace, model) exactly as graded: strict load of model.pth, eval mode."""
    ns = server_namespace(ARCH.read_text(), str(ARCH))
    model = ns["model"]
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu"))  # strict=True
    model.eval()
    return ns, model


def server_grey_float(rgb: np.ndarray) -> np.ndarray:
    """The server's grey formula in float64, unrounded: (N, 3, H, W) in [0,1] -> (N, 1, H, W)."""
    return server_grey(rgb, axis=1, keepdims=True)


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_import_guard_is_real():
    with pytest.raises(ImportError, match="numpy"):
        server_namespace("import numpy")
    with pytest.raises(ImportError, match="timm"):
        server_namespace("from timm import create_model")
    ns = server_namespace("import math, collections.abc\nimport torch.nn as nn\nx = math.pi")
    assert ns["x"] == pytest.approx(3.14159, abs=1e-5)


def test_shipped_instance_is_the_constructors_defaults(server):
    """The defaults written in MyCNN.__init__ are the shipped student's: a newcomer who writes
    MyCNN() gets the network model.pth was trained for (144 px inside, chunks of 16)."""
    ns, model = server
    default = ns["MyCNN"]()
    assert (default.input_size, default.eval_chunk) == (model.input_size, model.eval_chunk)
    assert default.dropout.p == model.dropout.p
    assert {k: v.shape for k, v in default.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    assert re.search(r"^model = MyCNN\(\)", ARCH.read_text(), flags=re.M), \
        "architecture.py's instance passes arguments: move them into the constructor's defaults"


def test_class_model_and_weights_file(server):
    ns, model = server
    assert isinstance(ns.get("MyCNN"), type) and issubclass(ns["MyCNN"], torch.nn.Module)
    assert isinstance(ns["model"], ns["MyCNN"])
    size = WEIGHTS.stat().st_size
    assert size <= MAX_WEIGHTS_BYTES, f"model.pth is {size / 1e6:.1f} MB"
    state = torch.load(WEIGHTS, map_location="cpu")
    assert set(state) == set(model.state_dict())
    assert all(v.device.type == "cpu" for v in state.values())


@pytest.mark.parametrize("n", [1, 7])
def test_output_shape_and_dtype(server, n):
    _, model = server
    out = model(rand(n, 1, 100, 100, seed=n))
    assert tuple(out.shape) == (n, 20) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_three_channel_input_equals_server_grey(server):
    _, model = server
    rgb = rand(5, 3, 100, 100, seed=1)
    grey = torch.from_numpy(server_grey_float(rgb.double().numpy())).float()
    out_rgb, out_grey = model(rgb), model(grey)
    assert tuple(out_rgb.shape) == (5, 20)
    torch.testing.assert_close(out_rgb, out_grey, atol=1e-4, rtol=0)
    # a colour photo is not simply its channel mean: the formula matters
    assert not torch.allclose(model(rgb.mean(1, keepdim=True)), out_grey, atol=1e-4, rtol=0)


@pytest.mark.parametrize("hw", [(64, 80), (128, 128), (100, 45)])
def test_other_input_sizes(server, hw):
    _, model = server
    out = model(rand(3, 1, *hw, seed=2))
    assert tuple(out.shape) == (3, 20) and torch.isfinite(out).all()


def test_eval_is_deterministic_and_batch_independent(server):
    _, model = server
    x = rand(12, 1, 100, 100, seed=3)
    a, b = model(x), model(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(model(x[:4]), a[:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x[7:8]), a[7:8], atol=1e-5, rtol=1e-5)


def test_toolkit_load_student_matches_server_load(server):
    _, model = server
    x = rand(4, 1, 100, 100, seed=4)
    student = load_student(ARCH, WEIGHTS)
    assert not student.training
    assert torch.equal(student(x), model(x))


BIG_BATCH_SCRIPT = r"""
import json, resource, sys, time, torch
ns = {"__name__": "__main__"}
exec(compile(open(sys.argv[1]).read(), sys.argv[1], "exec"), ns)
model = ns["model"]
model.load_state_dict(torch.load(sys.argv[2], map_location="cpu"))
model.eval()
x = torch.rand(6000, 1, 100, 100, generator=torch.Generator().manual_seed(0))
t0 = time.perf_counter()
out = model(x)
wall = time.perf_counter() - t0
print(json.dumps({"shape": list(out.shape), "finite": bool(torch.isfinite(out).all()),
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "wall_s": wall}))
"""


@pytest.mark.slow  # end to end at the server's scale: a 6,000-image batch in a fresh process (~30 s)
def test_6000_image_batch_peak_memory(capsys):
    proc = subprocess.run([sys.executable, "-c", BIG_BATCH_SCRIPT, str(ARCH), str(WEIGHTS)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    rss = report["maxrss_kb"] * 1024  # Linux reports KiB
    with capsys.disabled():
        print(f"\n[6000-batch] peak RSS {rss / 2**30:.2f} GiB, forward wall time {report['wall_s']:.1f} s")
    assert report["shape"] == [6000, 20] and report["finite"]
    assert rss < MAX_RSS_BYTES, f"peak RSS {rss / 2**30:.2f} GiB"


# ---- toolkit.student's own guard and loader -----------------------------------------------
def test_exec_architecture_rejects_numpy(tmp_path):
    bad = tmp_path / "architecture.py"
    bad.write_text(ARCH.read_text().replace("import torch\n", "import torch\nimport numpy as np\n", 1))
    assert "import numpy as np" in bad.read_text()
    with pytest.raises(ContractError, match="numpy") as err:
        exec_architecture(bad)
    assert str(bad) in str(err.value)
    sub = tmp_path / "sub.py"
    sub.write_text("import torch\nfrom scipy.special import softmax\nmodel = torch.nn.Linear(1, 1)\n")
    with pytest.raises(ContractError, match="scipy"):
        exec_architecture(sub)


def test_exec_architecture_allows_stdlib_and_needs_model(tmp_path):
    ok = tmp_path / "ok.py"
    ok.write_text("import math, os.path\nimport torch\nmodel = torch.nn.Linear(2, int(math.sqrt(4)))\n")
    assert isinstance(exec_architecture(ok)["model"], torch.nn.Linear)
    none = tmp_path / "none.py"
    none.write_text("import torch\nnet = torch.nn.Linear(2, 2)\n")
    with pytest.raises(ContractError, match="model"):
        exec_architecture(none)


@pytest.fixture
def real_state():
    return torch.load(WEIGHTS, map_location="cpu")


def test_load_student_rejects_wrong_shape(tmp_path, real_state):
    key = next(k for k, v in real_state.items() if v.dim() == 4)
    real_state[key] = torch.zeros(real_state[key].shape[0] + 1, *real_state[key].shape[1:])
    path = tmp_path / "model.pth"
    torch.save(real_state, path)
    with pytest.raises(ContractError) as err:
        load_student(ARCH, path)
    assert_one_line_error(err.value, path, key, prefix="")


def test_load_student_rejects_missing_key(tmp_path, real_state):
    key = sorted(real_state)[-1]
    del real_state[key]
    path = tmp_path / "model.pth"
    torch.save(real_state, path)
    with pytest.raises(ContractError) as err:
        load_student(ARCH, path)
    assert_one_line_error(err.value, path, key, prefix="")


def test_load_student_rejects_missing_and_non_dict_weights(tmp_path):
    with pytest.raises(ContractError, match="missing"):
        load_student(ARCH, tmp_path / "absent.pth")
    path = tmp_path / "model.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ContractError, match=str(path)):
        load_student(ARCH, path)


# ---- MyCNN is timm's efficientnet_lite0 (one-channel stem) in plain torch ---------------
def test_mycnn_equals_timm_efficientnet_lite0_with_the_same_weights():
    """Same parameter names, and the same outputs in train and eval mode (eval folds BatchNorm
    into the convolutions): ImageNet weights and timm-trained models load into MyCNN as is."""
    import timm
    ours = server_namespace(ARCH.read_text(), str(ARCH))["MyCNN"](input_size=None)
    torch.manual_seed(0)
    theirs = timm.create_model("efficientnet_lite0", num_classes=20, in_chans=1, drop_rate=0.0)
    with torch.no_grad():  # non-trivial BatchNorm statistics, or folding is not exercised
        for m in theirs.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    ours.dropout.p = 0.0
    x = rand(6, 1, 100, 100, seed=5)
    normalised = (x - 0.5) / 0.5  # MyCNN normalises its own [0, 1] input
    for mode in (False, True):
        ours.train(mode), theirs.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(normalised), atol=2e-4, rtol=1e-4)


def test_input_size_upsamples_inside_the_model():
    """MyCNN(input_size=128) is the same network run on the bilinearly upsampled 128x128
    picture (no mean/std or resize is left to the server); other sizes scale alike."""
    ns = server_namespace(ARCH.read_text(), str(ARCH))
    torch.manual_seed(0)
    native = ns["MyCNN"](input_size=None).eval()
    upsampling = ns["MyCNN"](input_size=128).eval()
    upsampling.load_state_dict(native.state_dict())
    x = rand(3, 1, 100, 100, seed=6)
    big = torch.nn.functional.interpolate(x, size=(128, 128), mode="bilinear", align_corners=False)
    assert tuple(upsampling.normalise(x).shape) == (3, 1, 128, 128)
    assert tuple(upsampling.normalise(rand(1, 1, 50, 75)).shape) == (1, 1, 64, 96)
    torch.testing.assert_close(upsampling(x), native(big), atol=1e-5, rtol=1e-5)
    assert tuple(native.normalise(x).shape) == (3, 1, 100, 100)  # None: the input's own size
