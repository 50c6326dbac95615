"""The student as the grading server sees it: architecture.py exec'd in a fresh namespace
(torch and the standard library only), model.pth loaded strictly on the CPU."""
from __future__ import annotations

import builtins
import sys
from pathlib import Path

import torch

from .data import DataError

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
