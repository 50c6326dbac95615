"""The evaluation report: metrics.json, report.md and figures for student vs teachers vs ensemble.

Library code only (no argparse, no model loading): ``toolkit.evaluate`` runs the models and
hands the predictions here. Every file is written atomically (toolkit.io).
"""
from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import metrics as M  # noqa: E402
from .io import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402

FIGURES = {
    "confusion_student": "confusion_student.png",
    "confusion_ensemble": "confusion_ensemble.png",
    "reliability": "reliability.png",
    "per_class_accuracy": "per_class_accuracy.png",
    "student_wrong_ensemble_right": "student_wrong_ensemble_right.png",
}


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------
def _finite(x):
    """JSON-safe float: NaN/inf -> None."""
    x = float(x)
    return x if math.isfinite(x) else None


def compute_metrics(classes: list[str], labels, student_lp, ensemble_lp,
                    teacher_lps: dict[str, np.ndarray] | None = None) -> dict:
    """Every number of the report from predictions alone (log-probabilities, (N, C))."""
    C = len(classes)
    y = np.asarray(labels, dtype=np.int64)
    s_lp, e_lp = M.log_softmax(student_lp), M.log_softmax(ensemble_lp)
    s_pred, e_pred = s_lp.argmax(1), e_lp.argmax(1)
    predictors = {"student": s_lp, "ensemble": e_lp}
    for name, lp in (teacher_lps or {}).items():
        predictors[f"teacher:{name}"] = M.log_softmax(lp)

    summary = {}
    for name, lp in predictors.items():
        s = M.classification_summary(lp, y)
        s["agreement_with_ensemble"] = M.agreement(lp.argmax(1), e_pred)["overall"]
        summary[name] = {k: (_finite(v) if isinstance(v, float) else v) for k, v in s.items()}

    agree = M.agreement(s_pred, e_pred, y, C)
    s_pc = M.per_class_precision_recall(y, s_pred, C)
    e_pc = M.per_class_precision_recall(y, e_pred, C)
    per_class = {
        "class": list(classes),
        "support": [int(v) for v in s_pc["support"]],
        "student_precision": [float(v) for v in s_pc["precision"]],
        "student_recall": [float(v) for v in s_pc["recall"]],
        "ensemble_precision": [float(v) for v in e_pc["precision"]],
        "ensemble_recall": [float(v) for v in e_pc["recall"]],
        "agreement": [_finite(v) for v in agree["per_class"]],
    }
    reliability = {}
    for name, lp in (("student", s_lp), ("ensemble", e_lp)):
        b = M.reliability_bins(lp, y)
        reliability[name] = {k: [_finite(v) for v in b[k]] for k in ("lower", "upper", "accuracy", "confidence")}
        reliability[name]["count"] = [int(v) for v in b["count"]]
    return {
        "classes": list(classes),
        "n": int(len(y)),
        "predictors": summary,
        "student_vs_ensemble": {"top1_agreement": agree["overall"],
                                "mean_kl_ensemble_to_student": M.mean_kl(e_lp, s_lp),
                                "student_wrong_ensemble_right": int(((s_pred != y) & (e_pred == y)).sum()),
                                "student_right_ensemble_wrong": int(((s_pred == y) & (e_pred != y)).sum())},
        "per_class": per_class,
        "confusion": {"student": M.confusion(y, s_pred, C).tolist(),
                      "ensemble": M.confusion(y, e_pred, C).tolist()},
        "reliability": reliability,
    }


# ----------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
# The whole report
# ----------------------------------------------------------------------------------------
def _fmt(v, digits=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _markdown(m: dict, meta: dict, efficiency: dict, timings: dict, examples_shown: int) -> str:
    L = []
    L.append(f"# Evaluation report: {meta.get('name', '')}\n")
    L.append(f"- data: `{meta.get('data')}`, {m['n']} images"
             + (f" (subset: `{meta['indices_file']}`)" if meta.get("indices_file") else " (whole folder)"))
    L.append(f"- student: `{meta.get('arch')}` + `{meta.get('weights')}` (sha256 {meta.get('weights_sha256', '?')[:12]})")
    L.append(f"- teachers ({len(meta.get('teachers', []))}): "
             + ", ".join(f"`{t}`" for t in meta.get("teachers", [])))
    L.append(f"- ensemble: {meta.get('ensemble_combine', 'mean_probs')} of the teachers' probabilities")
    L.append(f"- created {meta.get('created', '')} with torch {meta.get('torch')} "
             f"({meta.get('threads')} CPU threads)\n")

    L.append("## Scores\n")
    L.append("| predictor | accuracy | balanced acc | macro-F1 | NLL | ECE | T (in-sample) | NLL after T | ECE after T | agreement w/ ensemble |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for name, s in m["predictors"].items():
        L.append(f"| {name} | {_fmt(s['accuracy'])} | {_fmt(s['balanced_accuracy'])} | {_fmt(s['macro_f1'])} | "
                 f"{_fmt(s['nll'])} | {_fmt(s['ece'])} | {_fmt(s['ts_temperature'], 3)} | {_fmt(s['ts_nll'])} | "
                 f"{_fmt(s['ts_ece'])} | {_fmt(s['agreement_with_ensemble'])} |")
    L.append("")
    L.append("ECE: 15 equal-width confidence bins (Guo et al. 2017). **Temperature scaling is fitted "
             "on the evaluated data itself**, so the 'after T' columns are an optimistic, in-sample "
             "bound, not what a temperature fitted elsewhere would achieve.")
    L.append("Teachers (and the ensemble) scored on images they were trained on look better than they "
             "are: restrict to a held-out fold with `--indices-file` for honest numbers.\n")

    sv = m["student_vs_ensemble"]
    L.append("## Student vs ensemble\n")
    L.append(f"- top-1 agreement: {_fmt(sv['top1_agreement'])}")
    L.append(f"- mean KL(ensemble || student): {_fmt(sv['mean_kl_ensemble_to_student'])} nats")
    L.append(f"- student wrong but ensemble right: {sv['student_wrong_ensemble_right']} images "
             f"(shown: {examples_shown}); student right but ensemble wrong: {sv['student_right_ensemble_wrong']}\n")

    L.append("## Cost\n")
    threads = None
    L.append("| model | parameters | MACs / image | latency batch 1 (median) | latency batch 256 (median) | per image at 256 |")
    L.append("|---|---|---|---|---|---|")
    for name, e in efficiency.items():
        b1, b256 = e.get("latency_batch1"), e.get("latency_batch256")
        ms = (lambda v, d: f"{v * 1e3:.{d}f} ms")
        L.append(f"| {name} | {e['parameters']:,} | {e['macs_per_image'] / 1e6:.1f} M | "
                 f"{ms(b1['median_s'], 2) if b1 else '-'} | {ms(b256['median_s'], 1) if b256 else '-'} | "
                 f"{ms(b256['median_s'] / b256['batch'], 3) if b256 else '-'} |")
        threads = threads or e.get("latency_threads")
    L.append("")
    L.append("MACs via torch.utils.flop_counter (FLOPs / 2; convolutions and matmuls only) of the eval-mode "
             "forward, i.e. whatever the student does in eval mode (test-time augmentation included, if any). "
             f"Latency: CPU wall clock with {threads or '?'} torch thread(s), median of repeated runs on real "
             "images; on a machine busy with other work it is noisy and an upper bound.\n")

    pc = m["per_class"]
    L.append("## Per class\n")
    L.append("| class | n | student precision | student recall | ensemble precision | ensemble recall | agreement |")
    L.append("|---|---|---|---|---|---|---|")
    for i, c in enumerate(pc["class"]):
        L.append(f"| {c} | {pc['support'][i]} | {_fmt(pc['student_precision'][i], 3)} | {_fmt(pc['student_recall'][i], 3)} | "
                 f"{_fmt(pc['ensemble_precision'][i], 3)} | {_fmt(pc['ensemble_recall'][i], 3)} | "
                 f"{_fmt(pc['agreement'][i], 3)} |")
    L.append("")

    L.append("## Figures\n")
    for key, file in FIGURES.items():
        L.append(f"### {key.replace('_', ' ')}\n\n![{key}]({file})\n")

    if timings:
        L.append("## Timings\n")
        L.append(" | ".join(f"{k}: {v:.1f} s" for k, v in timings.items()) + "\n")
    return "\n".join(L)


def write_report(out_dir: str | Path, *, classes: list[str], labels, grey, names: list[str],
                 student_lp, ensemble_lp, teacher_lps: dict | None = None, meta: dict | None = None,
                 efficiency: dict | None = None, timings: dict | None = None,
                 max_examples: int = 24) -> dict:
    """Compute the metrics and write report.md, metrics.json and the PNGs into ``out_dir``.

    grey: (N, 1, H, W) uint8 images aligned with labels/predictions (the student's view).
    Returns the metrics dict (as written to metrics.json).
    """
    import time
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta, efficiency, timings = dict(meta or {}), dict(efficiency or {}), dict(timings or {})
    m = compute_metrics(classes, labels, student_lp, ensemble_lp, teacher_lps)
    timings["metrics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    y = np.asarray(labels, dtype=np.int64)
    s_lp, e_lp = M.log_softmax(student_lp), M.log_softmax(ensemble_lp)
    s_pred, e_pred = s_lp.argmax(1), e_lp.argmax(1)
    plot_confusion(m["confusion"]["student"], classes,
                   f"Student confusion matrix (accuracy {m['predictors']['student']['accuracy']:.3f}, n={m['n']})",
                   out / FIGURES["confusion_student"])
    plot_confusion(m["confusion"]["ensemble"], classes,
                   f"Ensemble confusion matrix (accuracy {m['predictors']['ensemble']['accuracy']:.3f}, n={m['n']})",
                   out / FIGURES["confusion_ensemble"])
    plot_reliability(m["reliability"], m["predictors"], out / FIGURES["reliability"])
    pc = m["per_class"]
    plot_per_class_accuracy(classes, pc["student_recall"], pc["ensemble_recall"], pc["support"],
                            out / FIGURES["per_class_accuracy"])
    # student wrong, ensemble right: the most confident student mistakes first
    idx = np.flatnonzero((s_pred != y) & (e_pred == y))
    idx = idx[np.argsort(-s_lp[idx, s_pred[idx]], kind="stable")][:max_examples]
    titles = [f"{names[i]}\ntrue: {classes[y[i]]}\nstudent: {classes[s_pred[i]]} ({math.exp(s_lp[i, s_pred[i]]):.2f})\n"
              f"ensemble: {classes[e_pred[i]]} ({math.exp(e_lp[i, e_pred[i]]):.2f})" for i in idx]
    plot_examples(grey, idx, titles, "Student wrong, ensemble right (most confident student mistakes first; "
                  "probabilities in brackets)", out / FIGURES["student_wrong_ensemble_right"])
    m["examples_student_wrong_ensemble_right"] = [names[i] for i in idx]
    timings["plots"] = time.perf_counter() - t0
    timings["total"] = sum(v for k, v in timings.items() if k != "total")

    doc = {"meta": meta, **m, "efficiency": efficiency, "timings_s": {k: round(v, 3) for k, v in timings.items()}}
    atomic_write_json(doc, out / "metrics.json")
    atomic_write_text(_markdown(m, meta, efficiency, timings, len(idx)), out / "report.md")
    return doc
