"""Evaluation metrics as pure functions of predictions (no I/O, no argparse).

Predictions are passed as (N, C) log-probabilities (``log_softmax`` of logits; any array-like,
numpy or torch) and labels as (N,) integer class ids. Classification scores delegate to
scikit-learn so that they mean exactly what the sklearn documentation says.

Calibration follows Guo et al. 2017, "On Calibration of Modern Neural Networks":
confidence = max probability, M = 15 equal-width bins B_m = ((m-1)/M, m/M],
ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|.
"""
from __future__ import annotations

import math
import statistics
import time
import warnings

import numpy as np
import torch
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support)

ECE_BINS = 15


def _np(x, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _labels_preds(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = _np(y_true, np.int64).ravel(), _np(y_pred, np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"labels {y_true.shape} and predictions {y_pred.shape} differ in length")
    return y_true, y_pred


def log_softmax(scores) -> np.ndarray:
    """(N, C) logits or unnormalised log-probabilities -> normalised log-probabilities (float64)."""
    z = _np(scores, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


# ----------------------------------------------------------------------------------------
# Classification scores (scikit-learn)
# ----------------------------------------------------------------------------------------
def accuracy(y_true, y_pred) -> float:
    return float(accuracy_score(*_labels_preds(y_true, y_pred)))


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean recall over the classes present in ``y_true`` (sklearn's definition)."""
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected
        warnings.simplefilter("ignore")
        return float(balanced_accuracy_score(*_labels_preds(y_true, y_pred)))


def macro_f1(y_true, y_pred) -> float:
    """Unweighted mean F1 over the classes present in labels or predictions (sklearn default)."""
    return float(f1_score(*_labels_preds(y_true, y_pred), average="macro", zero_division=0))


def per_class_precision_recall(y_true, y_pred, num_classes: int) -> dict[str, np.ndarray]:
    """Per class id 0..C-1: precision, recall (= per-class accuracy), F1 and support.

    A class never predicted has precision 0; a class absent from ``y_true`` has recall 0 and
    support 0 (check support before reading its recall).
    """
    p, r, f, s = precision_recall_fscore_support(*_labels_preds(y_true, y_pred),
                                                 labels=list(range(num_classes)), zero_division=0)
    return {"precision": p, "recall": r, "f1": f, "support": s}


def confusion(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    return confusion_matrix(*_labels_preds(y_true, y_pred), labels=list(range(num_classes)))


# ----------------------------------------------------------------------------------------
# Probabilistic scores
# ----------------------------------------------------------------------------------------
def nll(log_probs, y_true) -> float:
    """Mean negative log-likelihood of the true class (natural log)."""
    lp, y = log_softmax(log_probs), _np(y_true, np.int64).ravel()
    return float(-lp[np.arange(len(y)), y].mean())


def reliability_bins(log_probs, y_true, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin ((m-1)/M, m/M]: count, accuracy, mean confidence.

    Empty bins have count 0 and accuracy/confidence NaN.
    """
    probs = np.exp(log_softmax(log_probs))
    y = _np(y_true, np.int64).ravel()
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    # bin m (0-based) holds conf in (m/M, (m+1)/M]; conf == 0 (impossible for a softmax) -> bin 0
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {"lower": edges[:-1], "upper": edges[1:], "count": count, "accuracy": acc,
            "confidence": mean_conf}


def ece(log_probs, y_true, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error (Guo et al. 2017) with ``n_bins`` equal-width bins."""
    b = reliability_bins(log_probs, y_true, n_bins)
    n = b["count"].sum()
    filled = b["count"] > 0
    gaps = np.abs(b["accuracy"][filled] - b["confidence"][filled])
    return float((b["count"][filled] / n * gaps).sum())


def temperature_scale(log_probs, y_true) -> dict[str, float]:
    """Fit one temperature T on (log_probs, y_true) and score softmax(log_probs / T).

    The temperature is fitted on the very data it is scored on, so the result is an
    optimistic, in-sample bound on what temperature scaling can do.
    """
    from .ensemble import fit_temperature
    lp = torch.as_tensor(log_softmax(log_probs), dtype=torch.float32)
    y = torch.as_tensor(_np(y_true, np.int64))
    with warnings.catch_warnings():  # fit_temperature's float(tensor requiring grad)
        warnings.simplefilter("ignore", UserWarning)
        t = fit_temperature(lp, y)
    scaled = lp.double() / t
    return {"temperature": t, "nll": nll(scaled, y), "ece": ece(scaled, y)}


def classification_summary(log_probs, y_true) -> dict[str, float]:
    """All scalar scores of one predictor: accuracy ... ECE, and the same after temperature
    scaling fitted in-sample (``ts_*``)."""
    lp = log_softmax(log_probs)
    y = _np(y_true, np.int64).ravel()
    pred = lp.argmax(axis=1)
    ts = temperature_scale(lp, y)
    return {"n": int(len(y)), "accuracy": accuracy(y, pred), "balanced_accuracy": balanced_accuracy(y, pred),
            "macro_f1": macro_f1(y, pred), "nll": nll(lp, y), "ece": ece(lp, y),
            "ts_temperature": ts["temperature"], "ts_nll": ts["nll"], "ts_ece": ts["ece"]}


# ----------------------------------------------------------------------------------------
# Two predictors
# ----------------------------------------------------------------------------------------
def agreement(pred_a, pred_b, y_true=None, num_classes: int | None = None) -> dict:
    """Top-1 agreement: fraction of samples where both predict the same class.

    With ``y_true`` and ``num_classes`` also per true class (NaN for classes without samples).
    """
    a, b = _labels_preds(pred_a, pred_b)
    same = a == b
    out = {"overall": float(same.mean()) if len(same) else float("nan")}
    if y_true is not None and num_classes is not None:
        y = _np(y_true, np.int64).ravel()
        n = np.bincount(y, minlength=num_classes)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["per_class"] = np.bincount(y, weights=same.astype(np.float64), minlength=num_classes) / n
    return out


def mean_kl(log_p, log_q) -> float:
    """Mean over samples of KL(p || q) = sum_c p_c (log p_c - log q_c), in nats.

    For the distillation gap pass p = ensemble, q = student.
    """
    lp, lq = log_softmax(log_p), log_softmax(log_q)
    p = np.exp(lp)
    terms = np.where(p > 0, p * (lp - lq), 0.0)
    return float(terms.sum(axis=1).mean())


# ----------------------------------------------------------------------------------------
# Cost of a model
# ----------------------------------------------------------------------------------------
def parameter_count(model: torch.nn.Module) -> int:
    """All parameters (trainable or not); buffers such as BatchNorm statistics excluded."""
    return int(sum(p.numel() for p in model.parameters()))


@torch.no_grad()
def count_macs(model: torch.nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one ``model(example)`` call, via torch's FlopCounterMode
    (MACs = FLOPs / 2; counts convolutions and matmuls, not elementwise ops). Divide by
    the batch size for a per-image figure."""
    from torch.utils.flop_counter import FlopCounterMode
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(example)
    model.train(was_training)
    return int(counter.get_total_flops() // 2)


@torch.no_grad()
def latency(model: torch.nn.Module, example: torch.Tensor, runs: int = 10, warmup: int = 2) -> dict:
    """Wall-clock seconds of ``model(example)`` on the current device: median and min of
    ``runs`` timed calls after ``warmup`` untimed ones."""
    model.eval()
    for _ in range(warmup):
        model(example)
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        model(example)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times),
            "batch": int(example.shape[0])}


def model_cost(model: torch.nn.Module, batch: torch.Tensor, runs_b1: int, runs_b256: int,
               threads: int = 1) -> dict:
    """Parameters, MACs per image and CPU latency (batch 1 and 256) on real inputs.

    Latency runs with ``threads`` torch threads (restored afterwards): on a machine whose
    cores are busy with other work, several threads wait for each other and the numbers
    become meaningless (measured here: 2 threads 50x slower than 1 on a loaded 2-core box).
    """
    cost = {"parameters": parameter_count(model), "macs_per_image": count_macs(model, batch[:1])}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if runs_b1 > 0:
            cost["latency_batch1"] = latency(model, batch[:1], runs=runs_b1, warmup=2)
        if runs_b256 > 0:
            big = batch.repeat(math.ceil(256 / len(batch)), 1, 1, 1)[:256]
            cost["latency_batch256"] = latency(model, big, runs=runs_b256, warmup=1)
    finally:
        torch.set_num_threads(before)
    if runs_b1 > 0 or runs_b256 > 0:
        cost["latency_threads"] = threads
    return cost
