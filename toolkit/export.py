"""The student as TorchScript and ONNX, each reloaded from disk and checked against eager
PyTorch (parity within PARITY_TOLERANCE on the same inputs)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .fastpass import ExportWrapper
from .student import ContractError

PARITY_TOLERANCE = 1e-4


def export_student(model: torch.nn.Module, parity_inputs: torch.Tensor, out_dir: str | Path,
                   arch: str | Path = "architecture.py", opset: int = 17) -> dict:
    """Write out_dir/student.torchscript.pt and out_dir/student.onnx; return the max abs
    difference of each (reloaded from disk) to the eager model on ``parity_inputs`` and on
    its first image alone (so the dynamic batch dimension is checked too)."""
    import onnx
    import onnxruntime as ort
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    wrapper = ExportWrapper(model).eval()
    example = parity_inputs[:2]
    batches = [parity_inputs, parity_inputs[:1]]
    with torch.no_grad():
        refs = [model(b).float() for b in batches]

    ts_path, onnx_path = out_dir / "student.torchscript.pt", out_dir / "student.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit deprecation + TracerWarnings on the channel check
        try:
            with torch.no_grad():
                traced = torch.jit.trace(wrapper, example, check_trace=False)
            tmp = ts_path.with_name(f".{ts_path.name}.tmp")
            torch.jit.save(traced, str(tmp))
            os.replace(tmp, ts_path)
        except Exception as err:
            raise ContractError(f"{arch}: TorchScript trace failed ({type(err).__name__}: {err})") from None
        try:
            tmp = onnx_path.with_name(f".{onnx_path.name}.tmp")
            torch.onnx.export(wrapper, (example,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
            onnx.checker.check_model(str(tmp))
            os.replace(tmp, onnx_path)
        except Exception as err:
            raise ContractError(f"{arch}: ONNX export failed ({type(err).__name__}: {err})") from None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
        loaded = torch.jit.load(str(ts_path), map_location="cpu").eval()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ts_diff = max(float((loaded(b).float() - r).abs().max()) for b, r in zip(batches, refs))
    onnx_diff = max(float(abs(session.run(None, {"image": b.numpy()})[0] - r.numpy()).max())
                    for b, r in zip(batches, refs))
    return {"torchscript": {"path": str(ts_path), "max_abs_diff": ts_diff},
            "onnx": {"path": str(onnx_path), "max_abs_diff": onnx_diff, "opset": opset},
            "parity_images": len(parity_inputs), "tolerance": PARITY_TOLERANCE}
