"""A run folder's history as tables and a figure, and several runs side by side (pandas).

Every run folder (a teacher under teachers/, a distillation work dir) holds ``config.yaml``
and ``log.json`` (one dict per epoch, written by toolkit.engine.Trainer). From them:
  * ``summary.csv``: one row per epoch, timm's convention (epoch, train losses, val metrics,
    lr, seconds);
  * ``learning_curve.png``: losses and validation accuracy per epoch;
  * ``compare_runs``: one row per run with the config values that differ between the runs and
    each run's final metrics (``python -m toolkit.evaluate compare runs/*``).
The library reports progress through ``logging`` (loggers named ``toolkit.*``); the scripts call
``setup_logging`` so that those lines reach the console.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pandas as pd

from .data import DataError
from .io import atomic_write_text

LOG, CONFIG, SUMMARY, CURVE = "log.json", "config.yaml", "summary.csv", "learning_curve.png"


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (pytest and callers may swap it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Print the ``toolkit.*`` loggers' records as plain lines on stdout (once per process)."""
    logger = logging.getLogger("toolkit")
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


def history_frame(history: list[dict]) -> pd.DataFrame:
    """Per-epoch rows -> DataFrame, columns ordered epoch, step, train_*, val_*, lr, seconds, rest."""
    df = pd.DataFrame(history)
    first = [c for c in ("epoch", "step") if c in df]
    train = [c for c in df if c.startswith("train_")]
    val = [c for c in df if c.startswith("val_")]
    last = [c for c in ("lr", "seconds") if c in df]
    rest = [c for c in df if c not in {*first, *train, *val, *last}]
    return df[first + train + val + last + rest]


def write_run_summary(history: list[dict], out_dir: str | Path, curve: bool = True) -> None:
    """summary.csv (and, with ``curve``, learning_curve.png) beside log.json, atomically. The
    trainer rewrites the table every epoch and draws the curve after the last one."""
    if not history:
        return
    out_dir = Path(out_dir)
    df = history_frame(history)
    atomic_write_text(df.to_csv(index=False), out_dir / SUMMARY)
    if curve:
        from .figures import plot_learning_curve
        plot_learning_curve(df, out_dir / CURVE, title=out_dir.name)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders (holding log.json) among ``paths`` and below them, in the order given."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise DataError(f"{p}: no such run folder")
        found = [p] if (p / LOG).is_file() else sorted(q.parent for q in p.rglob(LOG))
        runs += [r for r in found if r not in runs]
    if not runs:
        raise DataError(f"{', '.join(map(str, paths))}: no run folder (one holding {LOG}) found")
    return runs


def _read_run(folder: Path) -> tuple[dict, pd.DataFrame]:
    import yaml
    try:
        history = json.loads((folder / LOG).read_text())
        config = yaml.safe_load((folder / CONFIG).read_text()) if (folder / CONFIG).is_file() else {}
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise DataError(f"{folder}: unreadable run files ({type(err).__name__}: {err})") from None
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise DataError(f"{folder / LOG}: not a list of per-epoch records")
    return (config if isinstance(config, dict) else {}), history_frame(history)


def compare_runs(folders: list[str | Path]) -> pd.DataFrame:
    """One row per run: its folder, the config values that differ between the runs, the number
    of epochs, the final epoch's metrics, the best val_acc and the total training seconds."""
    rows, configs = [], []
    for folder in find_runs(folders):
        config, df = _read_run(folder)
        configs.append({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in config.items()})
        last = df.iloc[-1] if len(df) else pd.Series(dtype=object)
        row = {"run": str(folder), "epochs": int(last.get("epoch", len(df))) if len(df) else 0}
        row.update({k: last[k] for k in df if k.startswith(("train_", "val_"))})
        if "val_acc" in df:
            row["best_val_acc"] = df["val_acc"].max()
        if "seconds" in df:
            row["seconds"] = df["seconds"].sum()
        rows.append(row)
    cfg = pd.DataFrame(configs)
    differ = [c for c in cfg if cfg[c].astype(str).nunique(dropna=False) > 1 and c not in ("out", "work_dir")]
    return pd.concat([pd.DataFrame(rows)[["run"]], cfg[differ], pd.DataFrame(rows).drop(columns="run")], axis=1)
