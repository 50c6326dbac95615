"""Which evaluated images each model trained on, and the scores that leave those images out.

A model scored on its own training images looks better than it is. Here, from what the
artefacts record (each teacher's k-fold config, the student's provenance file):
  * ``teacher_seen`` / ``student_seen``: (n,) bool per model, True where it trained on the image;
  * ``oof_ensemble_log_probs``: every image scored by the teachers that did not train on it
    (combined as the ensemble combines), so the ensemble gets an out-of-fold accuracy for free
    when its members are fold teachers;
  * ``read_heldout``: a nested held-out run's provenance (``distill.py --val-fold F``, e.g. from
    ``scripts/heldout_estimate.sh``): the student's accuracy on a fold no teacher and no student saw.
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
        seed = int(cfg["seed"]) if int(cfg.get("split_seed", -1)) < 0 else int(cfg["split_seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if fingerprint != data.fingerprint:
        return None
    if val_fold < 0:
        return torch.ones(len(idx), dtype=torch.bool)
    return (stratified_folds(data.labels, k, seed) != val_fold)[idx]


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
