"""The evaluation report: metrics.json, report.md and figures for student vs teachers vs ensemble.

Library code only (no argparse, no model loading): ``toolkit.evaluate`` runs the models and
hands the predictions here. Every file is written atomically (toolkit.io).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import metrics as M
from .figures import plot_confusion, plot_examples, plot_per_class_accuracy, plot_reliability
from .io import atomic_write_json, atomic_write_text

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


def honest_scores(labels, student_lp, teacher_lps: dict, seen: dict, oof_ensemble_lp=None, oof_covered=None,
                  heldout: list[dict] | None = None) -> list[dict]:
    """Scores on images the scored model never trained on, one row each: every teacher on the
    evaluated images it did not train on (its own val fold), the ensemble with each image scored
    by the teachers that did not train on it, the student on images it did not train on (if any),
    then the nested held-out estimates of ``heldout`` (toolkit.estimates.read_heldout rows)."""
    y = np.asarray(labels, dtype=np.int64)
    rows = []

    def score(name, what, lp, keep):
        keep = np.asarray(keep, dtype=bool)
        if not keep.any():  # trained on every evaluated image: nothing honest to say here
            return
        lp = M.log_softmax(lp)[keep]
        rows.append({"predictor": name, "images": int(keep.sum()), "what": what,
                     "accuracy": M.accuracy(y[keep], lp.argmax(1)), "nll": _finite(M.nll(lp, y[keep]))})
    for name, lp in teacher_lps.items():
        s = seen.get(f"teacher:{name}")
        if s is not None:
            score(f"teacher:{name}", "evaluated images it did not train on (out-of-fold)", lp, ~np.asarray(s))
    if oof_ensemble_lp is not None:
        score("ensemble", "each image by the teachers that did not train on it (out-of-fold)",
              oof_ensemble_lp, oof_covered)
    s = seen.get("student")
    if s is not None and not np.asarray(s).all():
        score("student", "evaluated images it did not train on", student_lp, ~np.asarray(s))
    for h in heldout or []:
        rows.append({"predictor": "student (nested held-out)", "images": h["images"],
                     "what": f"fold {h['val_fold']}, seed {h['seed']}, seen by no teacher and no student "
                             f"(`{h['file']}`; its ensemble: {_fmt(h['ensemble_accuracy'])})",
                     "accuracy": h["accuracy"], "nll": h["nll"]})
    return rows


def markdown_table(df: pd.DataFrame, digits: int = 4) -> str:
    """A DataFrame as a GitHub markdown table (floats rounded, None/NaN as '-')."""
    def cell(v):
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "-"
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.astype(object).itertuples(index=False)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# The whole report
# ----------------------------------------------------------------------------------------
def _fmt(v, digits=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


SCORE_COLUMNS = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc", "macro_f1": "macro-F1",
                 "nll": "NLL", "ece": "ECE", "ts_temperature": "T (in-sample)", "ts_nll": "NLL after T",
                 "ts_ece": "ECE after T", "agreement_with_ensemble": "agreement w/ ensemble"}


def per_class_table(m: dict) -> pd.DataFrame:
    """One row per class: support, student and ensemble precision / recall, their agreement."""
    pc = m["per_class"]
    return pd.DataFrame({"class": pc["class"], "n": pc["support"],
                         "student precision": pc["student_precision"], "student recall": pc["student_recall"],
                         "ensemble precision": pc["ensemble_precision"], "ensemble recall": pc["ensemble_recall"],
                         "agreement": pc["agreement"]})


def _markdown(m: dict, meta: dict, efficiency: dict, timings: dict, examples_shown: int) -> str:
    L = []
    L.append(f"# Evaluation report: {meta.get('name', '')}\n")
    L.append(f"- data: `{meta.get('data')}`, {m['n']} images"
             + (f" (subset: `{meta['indices_file']}`)" if meta.get("indices_file") else " (whole folder)"))
    L.append(f"- student: `{meta.get('arch')}` + `{meta.get('weights')}` "
             f"(sha256 {meta.get('weights_sha256', '?')[:12]})")
    L.append(f"- teachers ({len(meta.get('teachers', []))}): "
             + ", ".join(f"`{t}`" for t in meta.get("teachers", [])))
    L.append(f"- ensemble: {meta.get('ensemble_combine', 'mean_probs')} of the teachers' probabilities")
    L.append(f"- created {meta.get('created', '')} with torch {meta.get('torch')} "
             f"({meta.get('threads')} CPU threads)\n")

    L.append("## Honest estimates: images the scored model never trained on\n")
    if m.get("honest"):
        df = pd.DataFrame(m["honest"], columns=["predictor", "images", "accuracy", "nll", "what"])
        df = df.rename(columns={"nll": "NLL", "what": "scored on"})
        L.append(markdown_table(df) + "\n")
    else:
        L.append("None: no model here records images it did not train on.\n")
    if not any(r["predictor"].startswith("student") for r in m.get("honest", [])):
        L.append("The student has no held-out estimate here: `scripts/heldout_estimate.sh` runs the nested "
                 "recipe (a fold no teacher and no student sees); pass its provenance with `--heldout`.\n")

    seen = m.get("seen_fraction", {})
    L.append("## All evaluated images (in-sample where 'trained on' > 0)\n")
    df = pd.DataFrame([{"predictor": name, "trained on": seen.get(name), **{k: s[k] for k in SCORE_COLUMNS}}
                       for name, s in m["predictors"].items()]).rename(columns=SCORE_COLUMNS)
    L.append(markdown_table(df) + "\n")
    L.append("'trained on': the fraction of these images the model (for the ensemble: any teacher) was "
             "trained on, from its recorded k-fold split or provenance ('-': unknown). **Scores on training "
             "images are in-sample and flatter the model**: the honest figures are the table above. ECE: 15 "
             "equal-width confidence bins (Guo et al. 2017). **Temperature scaling is fitted on the evaluated "
             "data itself**, so the 'after T' columns are an optimistic, in-sample bound.\n")

    sv = m["student_vs_ensemble"]
    L.append("## Student vs ensemble\n")
    L.append(f"- top-1 agreement: {_fmt(sv['top1_agreement'])}")
    L.append(f"- mean KL(ensemble || student): {_fmt(sv['mean_kl_ensemble_to_student'])} nats")
    L.append(f"- student wrong but ensemble right: {sv['student_wrong_ensemble_right']} images "
             f"(shown: {examples_shown}); student right but ensemble wrong: {sv['student_right_ensemble_wrong']}\n")

    L.append("## Cost\n")
    ms = (lambda v, d: f"{v * 1e3:.{d}f} ms")
    cost = pd.DataFrame([{"model": name, "parameters": f"{e['parameters']:,}",
                          "MACs / image": f"{e['macs_per_image'] / 1e6:.1f} M",
                          "latency batch 1 (median)": (ms(e["latency_batch1"]["median_s"], 2)
                                                       if e.get("latency_batch1") else "-"),
                          "latency batch 256 (median)": (ms(e["latency_batch256"]["median_s"], 1)
                                                         if e.get("latency_batch256") else "-"),
                          "per image at 256": (ms(e["latency_batch256"]["median_s"] / e["latency_batch256"]["batch"], 3)
                                               if e.get("latency_batch256") else "-")}
                         for name, e in efficiency.items()])
    L.append(markdown_table(cost) if len(cost) else "not measured")
    threads = next((e["latency_threads"] for e in efficiency.values() if e.get("latency_threads")), None)
    L.append("")
    L.append("MACs via torch.utils.flop_counter (FLOPs / 2; convolutions and matmuls only) of the eval-mode "
             "forward, i.e. whatever the student does in eval mode (test-time augmentation included, if any). "
             f"Latency: CPU wall clock with {threads or '?'} torch thread(s), median of repeated runs on real "
             "images; on a machine busy with other work it is noisy and an upper bound.\n")

    L.append("## Per class\n")
    L.append(markdown_table(per_class_table(m), digits=3) + "\n")

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
                 max_examples: int = 24, seen: dict | None = None, oof_ensemble_lp=None,
                 oof_covered=None, heldout: list[dict] | None = None) -> dict:
    """Compute the metrics and write report.md, metrics.json, per_class.csv and the PNGs into
    ``out_dir``.

    grey: (N, 1, H, W) uint8 images aligned with labels/predictions (the student's view).
    seen: predictor name ('student', 'teacher:NAME', 'ensemble') -> (N,) bool, True where it
    trained on the image, or None if unknown. oof_ensemble_lp / oof_covered: the out-of-fold
    ensemble (toolkit.estimates.oof_ensemble_log_probs). heldout: nested held-out student runs
    (toolkit.estimates.read_heldout). These lead the report; in-sample scores follow, labelled.
    Returns the metrics dict (as written to metrics.json).
    """
    import time
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta, efficiency, timings = dict(meta or {}), dict(efficiency or {}), dict(timings or {})
    m = compute_metrics(classes, labels, student_lp, ensemble_lp, teacher_lps)
    seen = dict(seen or {})
    m["seen_fraction"] = {k: (None if v is None else float(np.mean(np.asarray(v, dtype=bool))))
                          for k, v in seen.items()}
    m["honest"] = honest_scores(labels, student_lp, teacher_lps or {}, seen, oof_ensemble_lp, oof_covered, heldout)
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
    atomic_write_text(per_class_table(m).to_csv(index=False), out / "per_class.csv")
    atomic_write_text(_markdown(m, meta, efficiency, timings, len(idx)), out / "report.md")
    return doc
