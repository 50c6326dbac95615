"""Frozen passes through ONNX Runtime: inference where inference is fast on a CPU.

Every pass that trains nothing (the teachers' trunk features, the labelling of the views, the
student's frozen-stage features, evaluation) runs a module whose weights do not change. Eager
PyTorch uses a fraction of this CPU for such convolutions; ONNX Runtime's CPU provider runs the
same graph several times faster (docs/results.md, bench/passes.py). ``frozen_runner(module,
example)`` exports the module once (traced, dynamic batch), keeps the ``.onnx`` in the cache folder
keyed by everything the graph depends on (structure, every weight and buffer, the input's shape
per image, opset and versions), checks ONNX Runtime against torch on ``example`` and returns a
function with the module's eval-mode forward. Where onnxruntime is missing, the device is not the
CPU, ``TOOLKIT_FAST_PASSES=0`` is set, or ONNX Runtime refuses or disagrees with the model, the
returned function is the torch module itself, and one log line says why.

Training stays in torch; the grading server's ``architecture.py`` stays torch-only.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import logging
import os
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from .data import default_cache_dir

log = logging.getLogger(__name__)

OPSET = 17
CHUNK = 8             # images per ONNX Runtime call: faster than 64 on this CPU (bench/passes.py)
PARITY_TOLERANCE = 1e-3  # max |ORT - torch| on the example, relative to max(1, max |torch|)
_SESSIONS: collections.OrderedDict = collections.OrderedDict()  # key -> InferenceSession, newest last
_MAX_SESSIONS = 4
_SAID: set[str] = set()  # the fallback reasons already logged in this process


def _say_once(reason: str, message: str) -> None:
    if reason not in _SAID:
        _SAID.add(reason)
        log.info(message)


def fast_passes_enabled(device: str | torch.device = "cpu") -> bool:
    """True when frozen passes may run in ONNX Runtime: on the CPU, onnxruntime importable,
    not switched off with ``TOOLKIT_FAST_PASSES=0``. Says why not, once per process."""
    if torch.device(device).type != "cpu":
        return False  # CUDA / MPS run their frozen passes in torch (AMP where the caller uses it)
    if os.environ.get("TOOLKIT_FAST_PASSES", "1") == "0":
        _say_once("off", "fast passes: off (TOOLKIT_FAST_PASSES=0); frozen passes run in torch")
        return False
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        _say_once("missing", "fast passes: onnxruntime is not installed; frozen passes run in torch")
        return False
    return True


def graph_key(module: nn.Module, example: torch.Tensor) -> str:
    """Hash of everything the exported graph depends on: the module's structure, every
    parameter and buffer, the input's per-image shape and dtype, the opset and the versions."""
    import onnxruntime
    h = hashlib.sha1(f"{module!r}|{tuple(example.shape[1:])}|{example.dtype}|{OPSET}|{torch.__version__}|"
                     f"{onnxruntime.__version__}".encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _quiet_stdout():
    """Silence file descriptor 1 (the exporter prints its IR graph there, from C++, on failure)."""
    import sys
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _export(module: nn.Module, example: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), _quiet_stdout():
        warnings.simplefilter("ignore")  # TracerWarnings and the TorchScript-exporter deprecation
        torch.onnx.export(module, (example[:2],), buf, dynamo=False, opset_version=OPSET,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return buf.getvalue()


def _session(graph: bytes):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same thread budget as torch's
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no busy-waiting between calls: the rendering of the next batch runs in torch meanwhile
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def onnx_session(module: nn.Module, example: torch.Tensor, name: str):
    """The ONNX Runtime session of ``module`` (eval mode) for inputs shaped like ``example``:
    from this process's memo, else the cached ``onnx-<key>.onnx``, else a fresh export (written to
    the cache atomically; a cache that cannot be written only costs the export next time)."""
    from .io import atomic_write
    key = graph_key(module, example)
    if key in _SESSIONS:
        _SESSIONS.move_to_end(key)
        return _SESSIONS[key]
    path = default_cache_dir() / f"onnx-{key}.onnx"
    session = None
    if path.is_file():
        try:
            session = _session(path.read_bytes())
        except Exception:  # a corrupt cache file: exported again below and replaced
            session = None
    if session is None:
        graph = _export(module, example)
        session = _session(graph)
        try:
            atomic_write(path, lambda f: f.write(graph))
        except OSError as err:
            log.warning(f"warning: {path}: ONNX graph of {name} not cached ({err.strerror or err})")
    _SESSIONS[key] = session
    while len(_SESSIONS) > _MAX_SESSIONS:
        _SESSIONS.popitem(last=False)
    return session


class ExportWrapper(torch.nn.Module):
    """The student's eval-mode computation (one chunk, any batch size) as one traceable graph.

    MyCNN.forward splits big batches into chunks with a Python loop whose length a trace
    would freeze; the exported graph takes any batch at once via ``_eval_logits`` instead.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, x):
        fn = getattr(self.model, "_eval_logits", None)
        return fn(x) if callable(fn) else self.model(x)


class OnnxRunner:
    """``module``'s eval-mode forward as an ONNX Runtime session: (B, ...) float32 tensor ->
    (B, ...) float32 tensor, run in chunks of ``chunk`` images."""

    def __init__(self, session, chunk: int = CHUNK):
        self.session, self.chunk = session, chunk

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().cpu().contiguous().numpy()
        outs = [self.session.run(None, {"x": x[i:i + self.chunk]})[0] for i in range(0, len(x), self.chunk)]
        return torch.from_numpy(outs[0] if len(outs) == 1 else np.concatenate(outs))


def frozen_runner(module: nn.Module, example: torch.Tensor, name: str, device: str | torch.device = "cpu",
                  fallback: Callable | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function equal to ``module(x)`` under ``torch.no_grad()`` in eval mode: ONNX Runtime's
    when it can (see the module docstring), checked on ``example`` (a few real inputs) against
    torch; else ``fallback`` (default: the torch module). ``name`` names the pass in the one
    fallback log line."""
    module.eval()
    fallback = module if fallback is None else fallback
    if not fast_passes_enabled(device):
        return fallback
    try:
        session = onnx_session(module, example, name)
        runner = OnnxRunner(session)
        with torch.no_grad():
            reference = module(example).float()
        got = runner(example)
        diff = float((got - reference.cpu()).abs().max()) if got.shape == reference.shape else float("inf")
        if not diff <= PARITY_TOLERANCE * max(1.0, float(reference.abs().max())):
            _say_once(f"parity|{name}", f"fast passes: {name}: ONNX Runtime differs from torch by {diff:.3g}; "
                      "this pass runs in torch")
            return fallback
    except Exception as err:  # an operator the exporter or the runtime does not support, ...
        _say_once(f"refused|{name}", f"fast passes: {name}: ONNX Runtime cannot run it ({type(err).__name__}: "
                  f"{' '.join(str(err).split())[:160]}); this pass runs in torch")
        return fallback
    import onnxruntime
    _say_once("on", f"fast passes: frozen passes run in ONNX Runtime {onnxruntime.__version__} "
              "(each model checked against torch on its first batch)")
    return runner
