"""Dataclass configs are the single source of truth: CLI flags are made from their fields.

``parse_config(Config)`` gives every field a ``--flag`` (booleans get ``--flag/--no-flag``),
an optional ``--config file.yaml`` sets defaults, and the result is the resolved dataclass.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path


def parse_config(cls, argv: list[str] | None = None, description: str | None = None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    defaults = {}
    if known.config is not None:
        import yaml
        if not known.config.is_file():
            raise SystemExit(f"error: {known.config}: config file not found")
        defaults = yaml.safe_load(known.config.read_text()) or {}
        unknown = set(defaults) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SystemExit(f"error: {known.config}: unknown keys {sorted(unknown)}")

    parser = argparse.ArgumentParser(description=description or cls.__doc__, parents=[pre],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        default = defaults.get(field.name, field.default if field.default is not dataclasses.MISSING
                               else field.default_factory())
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        help_text = field.metadata.get("help", " ")
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        elif typing.get_origin(kind) in (list, tuple):
            item = typing.get_args(kind)[0]
            parser.add_argument(flag, dest=field.name, nargs="*", type=item, default=default, help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, type=kind, default=default, help=help_text)
    args = vars(parser.parse_args(argv))
    args.pop("config", None)
    return cls(**args)
