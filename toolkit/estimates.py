"""Which evaluated images each model trained on, and the scores that leave those images out.

A model scored on its own training images looks better than it is. Here, from what the
artefacts record (each teacher's k-fold config, the student's provenance file):
  * ``teacher_seen`` / ``student_seen``: (n,) bool per model, True where it trained on the image;
  * ``oof_ensemble_log_probs``: every image scored by the teachers that did not train on it
    (combined as the ensemble combines), so the ensemble gets an out-of-fold accuracy for free
    when its members are fold teachers;
  * ``read_heldout``: a nested held-out run's provenance (``distill.py --val-fold F``, e.g. from
    ``scripts/heldout_estimate.sh``): the student's accuracy on a fold no teacher and no student saw;
  * ``read_pair`` / ``pairs_summary``: a distilled student and its hard-label control on the same
    held-out fold, split and seed, and the paired comparison over many such pairs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import CourseData, DataError
from .splits import stratified_folds, teacher_saw


def teacher_seen(teachers: list, data: CourseData, idx: torch.Tensor) -> list[torch.Tensor | None]:
    """Per teacher, (n,) bool: it trained on evaluated image idx[j], from the k-fold recorded in
    its config; None when unknown (its config names no data fingerprint, or other data: a fold
    split of another folder says nothing about this one)."""
    dummy = torch.zeros(len(data), dtype=torch.int64)  # used only when a config has no k-fold
    return [teacher_saw(t, dummy, data.labels)[idx]
            if getattr(t, "config", {}).get("data_fingerprint") == data.fingerprint else None
            for t in teachers]


def student_seen(weights: str | Path, data: CourseData, idx: torch.Tensor) -> torch.Tensor | None:
    """(n,) bool: the student trained on evaluated image idx[j], from the provenance file next
    to its weights; None when unknown (no provenance, or it was made from other data)."""
    prov = Path(weights).with_suffix(".provenance.json")
    try:
        doc = json.loads(prov.read_text())
        cfg, fingerprint = doc["config"], doc["run"]["data_fingerprint"]
        val_fold, k = int(doc["val_fold"]), int(cfg["folds"])
        seed = split_seed(cfg)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if fingerprint != data.fingerprint:
        return None
    if val_fold < 0:
        return torch.ones(len(idx), dtype=torch.bool)
    return (stratified_folds(data.labels, k, seed) != val_fold)[idx]


def split_seed(cfg: dict) -> int:
    """The k-fold seed of a student run from its recorded config: --split-seed, or --seed when -1."""
    return int(cfg["seed"]) if int(cfg.get("split_seed", -1)) < 0 else int(cfg["split_seed"])


def oof_ensemble_log_probs(member_logits: torch.Tensor, weights: torch.Tensor, seen: torch.Tensor,
                           combine: str = "mean_probs") -> tuple[torch.Tensor, torch.Tensor]:
    """(M, n, C) member logits, (M,) weights, (M, n) seen -> ((n, C) log-probabilities of the
    ensemble of the teachers that did not train on each image, (n,) bool: such a teacher exists).
    Images every teacher trained on get the full ensemble, and False."""
    unseen = ~seen
    covered = unseen.any(0)
    mask = torch.where(covered, unseen, torch.ones_like(unseen))             # (M, n)
    w = weights.float().view(-1, 1) * mask
    w = w / w.sum(0, keepdim=True)
    if combine == "mean_logits":
        return (member_logits * w[..., None]).sum(0).log_softmax(-1), covered
    log_p = member_logits.log_softmax(-1) + w.clamp(min=1e-30).log()[..., None]
    return torch.logsumexp(log_p, 0).log_softmax(-1), covered


def read_heldout(path: str | Path) -> dict:
    """A held-out student run's provenance -> {file, val_fold, seed, images, student accuracy / NLL,
    its ensemble's accuracy on the same fold, recipe}."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        val, cfg = doc.get("student_val") or {}, doc.get("config") or {}
        row = {"file": str(path), "val_fold": int(doc["val_fold"]), "seed": cfg.get("seed"),
               "images": int(doc.get("val_images", 0)), "accuracy": val.get("val_acc"),
               "nll": val.get("val_nll"), "ensemble_accuracy": (doc.get("ensemble") or {}).get("ensemble_val_acc"),
               "recipe": doc.get("recipe", "")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{path}: not a student provenance file ({type(err).__name__}: {err})") from None
    if row["val_fold"] < 0 or row["accuracy"] is None:
        raise DataError(f"{path}: not a held-out run (val_fold {row['val_fold']}, no student val_acc)")
    seen = (doc.get("ensemble") or {}).get("val_seen_by_teachers") or 0
    if seen:
        raise DataError(f"{path}: not a nested held-out run: {seen} of its {row['images']} val images were "
                        "training images of some teacher")
    return row


def find_heldout(root: str | Path = "runs") -> list[Path]:
    """Provenance files of the nested held-out estimates ``scripts/heldout_estimate.sh`` writes
    (``runs/estimate_v*_s*/distilled/model.provenance.json``), sorted."""
    return sorted(Path(root).glob("estimate_v*_s*/distilled/model.provenance.json"))


PAIR_FIELDS = ["fold", "seed", "distilled", "hard_label"]


def read_pair(distilled: str | Path, control: str | Path) -> dict:
    """One row of the paired comparison (accuracies in percent) from the provenance files of a
    distilled student and its hard-label control. DataError unless both are nested held-out runs
    on the same fold of the same split, with the same seed, and the control is the --hard-labels one
    (a control scored on another split, e.g. ``--seed S`` without ``--split-seed``, is no pair)."""
    rows, configs = [], []
    for path in (distilled, control):
        rows.append(read_heldout(path))
        configs.append(json.loads(Path(path).read_text()).get("config") or {})
    split = [(c.get("folds"), split_seed(c)) for c in configs]
    if rows[0]["val_fold"] != rows[1]["val_fold"] or split[0] != split[1]:
        raise DataError(f"{control}: not the same held-out images as {distilled} (fold {rows[1]['val_fold']} of "
                        f"split (folds, seed) {split[1]} against fold {rows[0]['val_fold']} of {split[0]})")
    if rows[0]["seed"] != rows[1]["seed"]:
        raise DataError(f"{control}: seed {rows[1]['seed']}, its distilled student {distilled}: {rows[0]['seed']}")
    # hard_labels, spelt scratch in provenance files written before the rename
    hard = [c.get("hard_labels", c.get("scratch")) for c in configs]
    if hard != [False, True]:
        raise DataError(f"{distilled} / {control}: expected a distilled student, then its --hard-labels control")
    return {"fold": rows[0]["val_fold"], "seed": rows[0]["seed"], "distilled": round(100 * rows[0]["accuracy"], 2),
            "hard_label": round(100 * rows[1]["accuracy"], 2)}


def pairs_summary(rows: list[dict]) -> dict:
    """Rows of ``PAIR_FIELDS`` -> {pairs, mean_gap, gap_se (standard error of the mean gap, nan
    for one pair), positive (pairs with gap > 0), mean_distilled, mean_hard_label}, in points."""
    import math
    import statistics
    gaps = [float(r["distilled"]) - float(r["hard_label"]) for r in rows]
    return {"pairs": len(gaps), "mean_gap": statistics.mean(gaps),
            "gap_se": statistics.stdev(gaps) / math.sqrt(len(gaps)) if len(gaps) > 1 else float("nan"),
            "positive": sum(g > 0 for g in gaps),
            "mean_distilled": statistics.mean(float(r["distilled"]) for r in rows),
            "mean_hard_label": statistics.mean(float(r["hard_label"]) for r in rows)}


def format_pairs(rows: list[dict], title: str) -> str:
    """The paired table (fold, seed, distilled, hard label, gap) and its summary line, as printed."""
    lines = [title, f"{'fold':>4} {'seed':>5} {'distilled':>10} {'hard_label':>11} {'gap':>7}"]
    for r in rows:
        gap = float(r["distilled"]) - float(r["hard_label"])
        lines.append(f"{r['fold']:>4} {r['seed']:>5} {float(r['distilled']):>9.2f}% {float(r['hard_label']):>10.2f}% "
                     f"{gap:>+7.2f}")
    s = pairs_summary(rows)
    se = f"standard error {s['gap_se']:.2f}" if s["pairs"] > 1 else "one pair: no standard error"
    lines.append(f"mean gap {s['mean_gap']:+.2f} points ({se}) over {s['pairs']} pair(s), "
                 f"positive in {s['positive']}; mean accuracy distilled {s['mean_distilled']:.2f} %, "
                 f"hard-label {s['mean_hard_label']:.2f} %")
    return "\n".join(lines)


def write_pairs_csv(rows: list[dict], path: str | Path) -> None:
    import csv
    import io

    from .io import atomic_write_text
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=PAIR_FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(text.getvalue(), path)


def read_pairs_csv(path: str | Path) -> list[dict]:
    """docs/heldout_pairs.csv -> rows; DataError naming the file for a missing column or a bad number."""
    import csv
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or set(PAIR_FIELDS) - set(rows[0]):
            raise ValueError(f"expected the columns {','.join(PAIR_FIELDS)} and at least one row")
        return [{"fold": int(r["fold"]), "seed": int(r["seed"]), "distilled": float(r["distilled"]),
                 "hard_label": float(r["hard_label"])} for r in rows]
    except (OSError, ValueError, TypeError) as err:
        raise DataError(f"{path}: not a paired-comparison CSV ({err})") from None
