"""The evaluation report's figures (matplotlib, files only): confusion matrices, reliability
diagrams, per-class accuracy, image grids, and a run's learning curve. Written atomically."""
from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .io import atomic_write  # noqa: E402


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def plot_confusion(cm, classes: list[str], title: str, path: Path) -> Path:
    """Counts in the cells, colour = fraction of the true class (row-normalised)."""
    cm = np.asarray(cm)
    C = len(classes)
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    side = max(6.0, 0.5 * C + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    cell_font = 8 if C <= 20 else 6
    for i in range(C):
        for j in range(C):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=cell_font,
                        color="white" if frac[i, j] > 0.55 else "black")
    ax.set_xticks(range(C), classes, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_yticks(range(C), classes, fontsize=9)
    ax.set_xlabel("predicted class", fontsize=11)
    ax.set_ylabel("true class", fontsize=11)
    ax.set_title(title, fontsize=12)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cbar.set_label("fraction of the true class")
    return _save(fig, path)


def plot_reliability(reliability: dict, summaries: dict, path: Path) -> Path:
    """One column per predictor: accuracy per confidence bin vs the diagonal, counts below."""
    names = list(reliability)
    fig, axes = plt.subplots(2, len(names), figsize=(5.8 * len(names), 7.0), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08})
    for col, name in enumerate(names):
        b = {k: np.array([np.nan if v is None else v for v in vals], dtype=float)
             for k, vals in reliability[name].items()}
        centres, width = (b["lower"] + b["upper"]) / 2, b["upper"] - b["lower"]
        ax, hist = axes[0, col], axes[1, col]
        filled = b["count"] > 0
        ax.bar(centres[filled], b["accuracy"][filled], width=width[filled], color="tab:blue",
               edgecolor="black", linewidth=0.6, label="accuracy in bin")
        gap_lo = np.minimum(b["accuracy"], b["confidence"])[filled]
        gap_hi = np.maximum(b["accuracy"], b["confidence"])[filled]
        ax.bar(centres[filled], gap_hi - gap_lo, bottom=gap_lo, width=width[filled], facecolor="none",
               edgecolor="tab:red", hatch="///", linewidth=0.8, label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.tick_params(labelbottom=False)
        s = summaries[name]
        ax.set_title(f"{name}: ECE {s['ece']:.3f} (after in-sample T={s['ts_temperature']:.2f}: "
                     f"{s['ts_ece']:.3f})", fontsize=10)
        hist.bar(centres, b["count"], width=width, color="grey", edgecolor="black", linewidth=0.5)
        hist.set_xlim(0, 1)
        hist.set_xlabel("confidence (max probability), 15 equal-width bins")
        hist.set_ylabel("images")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.93), ncol=3, fontsize=9,
               frameon=False)
    fig.suptitle("Reliability diagrams", y=1.0, fontsize=12)
    return _save(fig, path)


def plot_per_class_accuracy(classes: list[str], student_acc, ensemble_acc, support, path: Path) -> Path:
    """Horizontal grouped bars with their values: class names stay horizontal and readable."""
    C = len(classes)
    y = np.arange(C)
    fig, ax = plt.subplots(figsize=(9, max(4.0, 0.45 * C + 1.8)))
    h = 0.4
    for offset, acc, label, colour in ((-h / 2, student_acc, "student", "tab:orange"),
                                       (h / 2, ensemble_acc, "ensemble", "tab:blue")):
        acc = np.asarray(acc, dtype=float)
        ax.barh(y + offset, acc, height=h, label=label, color=colour)
        for yi, a, n in zip(y + offset, acc, support):
            if n:
                ax.text(a + 0.01, yi, f"{a:.2f}", va="center", ha="left", fontsize=7)
    ax.set_yticks(y, [f"{c} (n={n})" for c, n in zip(classes, support)], fontsize=9)
    ax.set_ylim(C - 0.5, -0.5)  # first class on top
    ax.set_xlim(0, 1.1)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("per-class accuracy (recall)")
    ax.set_ylabel("true class")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=9, frameon=False)
    ax.set_title("Per-class accuracy: student vs ensemble", pad=24)
    return _save(fig, path)


def plot_examples(grey, indices, titles: list[str], heading: str, path: Path, cols: int = 6) -> Path:
    """Grid of grey images (N, 1, H, W) uint8 at ``indices`` with one title each."""
    indices = list(indices)
    if not indices:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{heading}:\nnone in this data", ha="center", va="center", fontsize=11)
        return _save(fig, path)
    cols = min(cols, len(indices))
    rows = math.ceil(len(indices) / cols)
    # explicit geometry (inches): every image gets room for a 5-line title above it
    img, gap, title = 2.3, 0.15, 0.85
    width = cols * (img + gap) + gap
    heading = textwrap.fill(heading, max(30, int(width * 10)))
    head = 0.25 + 0.22 * (heading.count("\n") + 1)
    height = rows * (img + title) + head + 0.1
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(left=gap / width, right=1 - gap / width, top=1 - (head + title) / height,
                        bottom=0.1 / height, wspace=gap / img, hspace=title / img)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i, text in zip(axes.flat, indices, titles):
        img_arr = np.asarray(grey[i])[0]
        ax.imshow(img_arr, cmap="gray", vmin=0, vmax=255)
        ax.set_title(text, fontsize=8, loc="left")
    fig.suptitle(heading, fontsize=11, y=1 - 0.15 / height, va="top")
    return _save(fig, path)


def plot_learning_curve(history, path: Path, title: str = "") -> Path:
    """A run's per-epoch history (DataFrame with epoch, train_* losses, val_* metrics): losses on
    the left, validation accuracy on the right (when the run had a validation split)."""
    losses = [c for c in history if c.startswith("train_") or c == "val_nll"]
    accs = [c for c in history if c.startswith("val_") and c != "val_nll"]
    fig, axes = plt.subplots(1, 2 if accs else 1, figsize=(10 if accs else 5.5, 3.8), squeeze=False)
    x = history["epoch"] if "epoch" in history else np.arange(1, len(history) + 1)
    for ax, columns, ylabel in zip(axes[0], (losses, accs), ("loss / NLL", "validation")):
        for c in columns:
            ax.plot(x, history[c], marker="o", label=c)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if columns:  # a run with zero training steps logs no loss
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Learning curve {title}".strip(), fontsize=11)
    return _save(fig, path)
