"""Dataclass configs are the single source of truth: CLI flags, help, defaults, allowed values
and their checks are all made from the fields.

    @dataclass
    class Config:
        epochs: int = option(10, "training epochs", min=1)
        mode: str = option("cached", "where the soft targets come from", choices=("cached", "online"))

    cfg = parse_config(Config, argv)

``parse_config`` gives every field a ``--flag`` (booleans get ``--flag/--no-flag``) whose
``--help`` line is the field's help text, its default and its allowed values; a closed set of
values is a real argparse ``choices`` (a typo is refused, listing the valid ones). An optional
``--config file.yaml`` sets defaults: its values are coerced to the field's type or refused.
Every value is then checked (range, finiteness, choices, paths, the config's own ``check()``)
before the caller touches any data or model. Every problem is one ``ConfigError`` line
naming the flag (or the config file and key) that holds the bad value.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import typing
from pathlib import Path

from .data import DataError

# Keys a run records in its config.yaml beside the resolved config (train_teacher.py adds the
# data's fingerprint, the class list and the trunk cache key): accepted and ignored on replay,
# so every saved config.yaml replays with --config.
RECORDED_KEYS = frozenset({"data_fingerprint", "classes", "trunk_cache_key"})


class ConfigError(DataError):
    """A bad flag or config value; the one-line message names the flag or file and key. A
    DataError, like every other bad input, so callers that catch those catch it too."""


def option(default, help: str, *, choices: tuple | None = None, min: float | None = None,
           max: float | None = None, below: float | None = None, path: str | None = None,
           or_file: bool = False, check=None, positional: bool = False, acts_on: tuple | None = None):
    """A dataclass field with its CLI metadata; ``default`` REQUIRED: a flag that must be given.

    choices: the allowed values (for lists: of each item); ``or_file``: or an existing file.
    min / max: inclusive bounds, below: exclusive upper bound (floats must also be finite).
    path: "in_dir" / "in_file" must exist; "out_file" / "out_dir" must be creatable or
    writable (not a folder where a file goes, not under a regular file, folder writable).
    check: ``check(value) -> problem string or None`` for anything else.
    positional: a positional argument (``RUN ...`` for a list), not a ``--flag``.
    acts_on: ``(predicate(config) -> bool, "the paths it acts on")``: a value other than the default
    is refused in one line when the config takes a path the option cannot act on.
    """
    meta = {"help": help, "choices": choices, "min": min, "max": max, "below": below, "path": path,
            "or_file": or_file, "check": check, "positional": positional, "acts_on": acts_on}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


REQUIRED = dataclasses.MISSING  # option(REQUIRED, ...): no default, the flag must be given


class ConfigParser(argparse.ArgumentParser):
    """argparse whose errors are one ConfigError line (``--flag: what is wrong``), not usage + exit."""

    def error(self, message):
        message = message.replace("argument ", "", 1) if message.startswith("argument ") else message
        raise ConfigError(f"{message} (see --help)")


def parse_config(cls, argv: list[str] | None = None, description: str | None = None, prog: str | None = None):
    """argv (default sys.argv[1:]) -> a checked ``cls`` instance; ConfigError on any bad value."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = ConfigParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", type=Path, metavar="FILE.yaml",
                     help="a YAML file of field: value defaults (e.g. a run's saved config.yaml); flags override it")
    known, _ = pre.parse_known_args(argv)
    for old, new in getattr(cls, "RENAMED", {}).items():  # an old spelling: a hint, not "unrecognized"
        flag = "--" + old.replace("_", "-")
        if any(a in (flag, "--no-" + flag[2:]) or a.startswith(flag + "=") for a in argv):
            raise ConfigError(f"{flag}: renamed --{new.replace('_', '-')} (see --help)")
    hints = typing.get_type_hints(cls)
    # the script's own fields first in --help, then those it shares with others (TrainingRun's)
    shared = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    fields = {f.name: f for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in shared)}
    # a recipe file names an alternative (toolkit.recipe): the config's ``argv_defaults(argv)``
    recipe_source, recipe_values = cls.argv_defaults(argv) if hasattr(cls, "argv_defaults") else ("", {})
    file_values = (read_config_file(known.config, fields, hints, getattr(cls, "RENAMED", {}))
                   if known.config is not None else {})

    parser = ConfigParser(description=description or cls.__doc__, parents=[pre], allow_abbrev=False, prog=prog,
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = {}
    for field in fields.values():
        flag = "--" + field.name.replace("_", "-")
        kind, meta = hints[field.name], field.metadata
        help_text = (meta.get("help") or " ") + _range_text(meta)
        choices = meta.get("choices")
        if choices and meta.get("or_file"):
            help_text += f" (one of {', '.join(map(str, choices))}, or a file)"
            choices = None  # checked below: argparse cannot express "or a file"
        if field.default is REQUIRED and field.default_factory is REQUIRED and field.name not in file_values:
            default = argparse.SUPPRESS
        else:
            default = file_values.get(field.name, recipe_values.get(
                field.name, field.default if field.default is not REQUIRED else field.default_factory()))
        defaults[field.name] = default
        many = typing.get_origin(kind) in (list, tuple)
        if meta.get("positional"):
            item = typing.get_args(kind)[0] if many else kind
            parser.add_argument(field.name, nargs="+" if many else None, type=item, help=help_text,
                                metavar=field.name.upper())
        elif default is argparse.SUPPRESS:
            parser.add_argument(flag, dest=field.name, nargs="+" if many else None, required=True,
                                type=typing.get_args(kind)[0] if many else kind, help=help_text + " (required)",
                                choices=choices, default=default)
        elif kind is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        elif many:
            item = typing.get_args(kind)[0]
            parser.add_argument(flag, dest=field.name, nargs="*", type=item, default=default, help=help_text,
                                choices=choices, metavar=item.__name__.upper() if not choices else None)
        else:
            parser.add_argument(flag, dest=field.name, type=kind, default=default, help=help_text,
                                choices=choices)
    args = vars(parser.parse_args(argv))
    args.pop("config", None)
    cfg = cls(**args)

    def culprit(name: str) -> str:
        flag = "--" + name.replace("_", "-")
        given = any(a == flag or a.startswith(flag + "=") or a == "--no-" + flag[2:] for a in argv)
        if given or (name not in file_values and name not in recipe_values):
            return flag
        return f"{known.config}: {name}" if name in file_values else f"{recipe_source}: {name}"

    for name, field in fields.items():
        problem = check_value(getattr(cfg, name), field.metadata)
        if problem:
            raise ConfigError(f"{culprit(name)}: {problem}")
    check_cache_dir()
    if hasattr(cfg, "check"):  # relations between fields: (field name, problem) or None
        found = cfg.check()
        if found:
            name, problem = found
            raise ConfigError(f"{culprit(name)}: {problem}")
    for name, field in fields.items():  # an option this run's path cannot act on: refused, never ignored
        acts_on = field.metadata.get("acts_on")
        if acts_on and getattr(cfg, name) != defaults[name] and not acts_on[0](cfg):
            raise ConfigError(f"{culprit(name)}: acts on {acts_on[1]} only, not on this run's path; drop it")
    return cfg


def parse_command(commands: dict[str, type], argv: list[str] | None = None, prog: str = "",
                  description: str = "") -> tuple[str, object]:
    """``COMMAND [flags]`` -> (command, its config checked by ``parse_config``): one dataclass per
    command; a missing or unknown command is one ConfigError line, ``--help`` lists the commands."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = ", ".join(commands)
    if argv[:1] in (["-h"], ["--help"]):
        width = max(map(len, commands))
        lines = [f"  {name:<{width}}  {(cls.__doc__ or '').strip().splitlines()[0]}" for name, cls in commands.items()]
        print(f"usage: {prog} COMMAND [flags]   ({prog} COMMAND --help: its flags)\n\n{description}\n\n"
              "commands:\n" + "\n".join(lines))
        raise SystemExit(0)
    if not argv or argv[0].startswith("-"):
        raise ConfigError(f"COMMAND: missing, the first word is one of {names} (see --help)")
    if argv[0] not in commands:
        raise ConfigError(f"{argv[0]}: invalid command (choose from {names})")
    return argv[0], parse_config(commands[argv[0]], argv[1:], prog=f"{prog} {argv[0]}".strip())


def _range_text(meta) -> str:
    parts = [f">= {meta['min']}" if meta.get("min") is not None else "",
             f"<= {meta['max']}" if meta.get("max") is not None else "",
             f"< {meta['below']}" if meta.get("below") is not None else ""]
    parts = [p for p in parts if p]
    return f" [{', '.join(parts)}]" if parts else ""


# ----------------------------------------------------------------------------------------
# The config file
# ----------------------------------------------------------------------------------------
def load_yaml_mapping(path: Path, what: str = "config file", expected: str = "'field: value' lines",
                      error: type = None) -> dict:
    """A YAML file holding a mapping -> that dict ({} for an empty file). ``error`` (default
    ConfigError) names the file, and the line and column of a syntax error, in one line."""
    import yaml
    error = error or ConfigError
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what_failed = getattr(err, "problem", None) or type(err).__name__
        raise error(f"{path}: not valid YAML ({what_failed}{where})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path}: {what} cannot be read ({type(err).__name__})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise error(f"{path}: expected {expected}, got a YAML {type(raw).__name__}")
    return raw


def read_config_file(path: Path, fields: dict, hints: dict, renamed: dict | None = None) -> dict:
    """YAML file -> {field: value coerced to the field's type}; ConfigError naming file and key
    (a key ``renamed`` maps to its new name: a hint saying so)."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found" + (" (it is a folder)" if path.is_dir() else ""))
    raw = load_yaml_mapping(path)
    old = sorted(set(map(str, raw)) & set(renamed or {}))
    if old:
        raise ConfigError(f"{path}: {old[0]}: renamed {renamed[old[0]]} (write {renamed[old[0]]}: in the file)")
    unknown = sorted(set(map(str, raw)) - set(fields) - RECORDED_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown} (valid: {', '.join(fields)})")
    values = {}
    for key, value in raw.items():
        if key in RECORDED_KEYS:
            continue
        try:
            values[key] = coerce(value, hints[key])
        except ValueError as err:
            raise ConfigError(f"{path}: {key}: {err}") from None
    return values


def coerce(value, kind):
    """A YAML value -> ``kind`` (bool, int, float, str, list[...]); ValueError if it is not one."""
    if typing.get_origin(kind) in (list, tuple):
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {_describe(value)} (write [a, b] or one '- a' line per item)")
        item = typing.get_args(kind)[0]
        return [coerce(v, item) for v in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {_describe(value)}")
    if kind in (int, float):
        return _coerce_number(value, kind)
    if kind is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected a string, got {_describe(value)}")
    return value


def _coerce_number(value, kind):
    """int: an int, a finite integral float or an integer string; float: an int, a float or a
    number string (YAML 1.1 reads 1e-3, with no dot, as a string). Booleans are neither."""
    if not isinstance(value, bool):
        if isinstance(value, int) or (kind is float and isinstance(value, float)):
            return kind(value)
        if kind is int and isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return kind(value.strip())
            except ValueError:
                pass
    raise ValueError(f"expected {'an integer' if kind is int else 'a number'}, got {_describe(value)}")


def _describe(value) -> str:
    if value is None:
        return "nothing (null)"
    kind = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)
    return f"{kind} {value!r}"


# ----------------------------------------------------------------------------------------
# Checks of one value
# ----------------------------------------------------------------------------------------
def check_value(value, meta) -> str | None:
    """The problem with one field's value (per its metadata), or None."""
    items = value if isinstance(value, list) else [value]
    for v in items:
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be a finite number, got {v}"
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if meta.get("min") is not None and v < meta["min"]:
                return f"must be >= {meta['min']}, got {v}"
            if meta.get("max") is not None and v > meta["max"]:
                return f"must be <= {meta['max']}, got {v}"
            if meta.get("below") is not None and v >= meta["below"]:
                return f"must be < {meta['below']}, got {v}"
        choices = meta.get("choices")
        if choices and v not in choices:
            if not (meta.get("or_file") and Path(str(v)).is_file()):
                allowed = ", ".join(map(str, choices)) + (" or an existing file" if meta.get("or_file") else "")
                return f"invalid choice {v!r} (choose from {allowed})"
    if meta.get("path") and value != "":  # an empty path: not given (the field's help says what then)
        problem = path_problem(value, meta["path"])
        if problem:
            return problem
    if meta.get("check") is not None:
        return meta["check"](value)
    return None


def path_problem(path: str, kind: str) -> str | None:
    """in_dir / in_file must exist as that; out_file / out_dir go through toolkit.io's check
    (which raises PermissionError for a folder that exists but cannot be written)."""
    p = Path(path)
    if kind == "in_dir":
        if not p.exists():
            return f"{p}: folder does not exist"
        return None if p.is_dir() else f"{p}: is a file, expected a folder"
    if kind == "in_file":
        if not p.exists():
            return f"{p}: file does not exist"
        return None if p.is_file() else f"{p}: is a folder, expected a file"
    from .io import output_problem
    return output_problem(p, is_dir=kind == "out_dir")


def check_device(name: str) -> str | None:
    """'auto', 'cpu', 'cuda[:i]', 'mps' ... that exists on this machine."""
    if name == "auto":
        return None
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"invalid device {name!r} (auto, cpu, cuda, cuda:N or mps)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"{name}: no CUDA device on this machine (use --device cpu or auto)"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return f"{name}: MPS is not available on this machine (use --device cpu or auto)"
    elif device.type not in ("cpu", "cuda", "mps"):
        return f"unsupported device {name!r} (auto, cpu, cuda, cuda:N or mps)"
    return None


def check_timm_model(name: str) -> str | None:
    import difflib

    import timm
    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, timm.list_models(), n=4)
    return f"unknown timm model {name!r}" + (f" (similar: {', '.join(close)})" if close else "")


def check_cache_dir() -> None:
    """The data/trunk cache location ($TOOLKIT_CACHE) must be a folder or creatable as one."""
    cache = Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache" / "distill-toolkit"))
    try:
        problem = path_problem(str(cache), "out_dir")
    except PermissionError:  # an unwritable cache only costs time (data.py warns and goes on)
        return
    if problem:
        raise ConfigError(f"TOOLKIT_CACHE: cache location {problem}")


def check_recipe_path(path: str) -> str | None:
    """'' (the default recipe) or an existing file (its content was read by recipe_defaults)."""
    return None if not path or Path(path).is_file() else f"{path}: recipe file not found"


# ----------------------------------------------------------------------------------------
# Fields shared by the training scripts
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(kw_only=True)
class TrainingRun:
    """The fields every training script shares: schedule, optimiser, sampling, split, device,
    checkpoints (``engine.make_trainer`` reads them), each declared, documented and checked once.
    Those the scripts set apart (epochs, batch size, warm-up, EMA, checkpoint cadence) have no
    default here: each script declares its own with ``run_field``, at its own field."""
    epochs: int = option(dataclasses.MISSING, "training epochs", min=1)
    batch_size: int = option(dataclasses.MISSING, "images per step", min=1)
    lr: float = option(2e-3, "learning rate per 256 images (actual: lr * batch_size / 256)", min=1e-8)
    optimizer: str = option("adamw", "optimizer", choices=("adamw", "sgd"))
    weight_decay: float = option(0.05, "decoupled weight decay (not on biases and norms)", min=0, max=10)
    warmup_epochs: float = option(dataclasses.MISSING, "linear warm-up, epochs", min=0)
    ema_decay: float = option(dataclasses.MISSING, "EMA of the weights (0: off)", min=0, below=1)
    balance_power: float = option(0.5, "class-balanced sampling: class c drawn ~ n_c ** power (0: uniform)",
                                  min=0, max=1)
    folds: int = option(3, "k of the stratified k-fold split", min=2)
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps", check=check_device)
    amp: bool = option(True, "bf16/fp16 autocast, on CUDA only")
    checkpoint_every: int = option(dataclasses.MISSING, "steps between checkpoints (0: only at epoch ends)", min=0)
    resume: bool = option(False, "continue from checkpoint.pth in the run's folder (a teacher's --out, a "
                          "student's --work-dir); it must belong to this run (a finished run of another "
                          "config or data is refused; of this one: nothing left to do)")
    keep_checkpoint: bool = option(False, "keep the training checkpoint.pth once the result is written "
                                   "(otherwise it is removed: the result and log.json describe the run)")
    recipe: str = option("", "recipe file (YAML) naming an alternative to the default recipe (the field "
                         "defaults); see toolkit/recipe.py", check=check_recipe_path)


def run_field(name: str, default):
    """TrainingRun's field ``name`` (its help, range and checks) with a script's own ``default``."""
    base = {f.name: f for f in dataclasses.fields(TrainingRun)}
    if name not in base:
        raise TypeError(f"TrainingRun has no field {name!r}")
    meta = dict(base[name].metadata)
    return option(default, meta.pop("help"), **meta)
