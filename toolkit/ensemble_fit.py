"""Fitting a heterogeneous ensemble on out-of-fold predictions: member weights, temperature,
and greedy ensemble selection with replacement (Caruana et al. 2004).

Everything here takes *out-of-fold* member predictions: for each image, the prediction of a
teacher that never trained on it. Fitted on anything else (a teacher's own training images, or
the fold being reported), the weights reward memorisation or leak the test labels.

A *recipe* is one way of making a teacher (backbone, input, frozen stages, epochs, ...); a
k-fold recipe has k fold teachers, and every image is out-of-fold for exactly one of them. So
recipes, not single teachers, are the ensemble's members: one weight per recipe, shared by its
fold teachers.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

# Config keys that differ between the fold teachers of one recipe (or do not change the model).
_PER_FOLD_KEYS = {"fold", "exclude_folds", "out", "resume", "checkpoint_every", "device", "data",
                  "data_fingerprint", "trunk_cache_key", "classes", "amp"}


def recipe_key(config: dict, model_name: str = "") -> str:
    """A readable key naming the recipe of a teacher from its saved config: teachers with the
    same key differ only in the fold they hold out."""
    if not config:
        return model_name
    short = str(config.get("model", model_name)).replace("efficientnet_", "")
    rest = {k: v for k, v in sorted(config.items()) if k not in _PER_FOLD_KEYS | {"model"}}
    return f"{short}@{config.get('input_size', '?')}/{hashlib.sha1(repr(rest).encode()).hexdigest()[:6]}"


def recipe_groups(teachers: list) -> dict[str, list[int]]:
    """{recipe key: [teacher indices]} in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(teachers):
        groups.setdefault(recipe_key(getattr(t, "config", {}), t.model_name), []).append(i)
    return groups


def recipe_oof_log_probs(member_logits: torch.Tensor, mask: torch.Tensor,
                         groups: dict[str, list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collapse fold teachers into recipes.

    member_logits: (M, N, C) logits of every teacher on the plain images; mask: (M, N) bool,
    True where the teacher did NOT train on the image (out-of-fold).
    -> (R, N, C) log-probabilities (per recipe, the probability mean of its out-of-fold
    teachers), and (N,) bool: images every recipe has an out-of-fold prediction for.
    """
    log_p = member_logits.float().log_softmax(-1)
    within = recipe_weight_matrix(groups, torch.ones(len(groups)), mask).clamp(min=1e-30).log()  # (M, N)
    out = [torch.logsumexp(log_p[members] + within[members, :, None], 0) for members in groups.values()]
    covered = torch.stack([mask[members].any(0) for members in groups.values()]).all(0)
    return torch.stack(out), covered


def recipe_weight_matrix(groups: dict[str, list[int]], recipe_weights: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """(M, N) per-image teacher weights: recipe r's weight shared equally by its teachers that
    may label the image (``mask`` (M, N)), so a recipe weighs the same whatever number of its
    fold teachers hold an image out."""
    weights = torch.zeros(mask.shape)
    for r, members in enumerate(groups.values()):
        m = mask[members].float()
        weights[members] = recipe_weights[r] * m / m.sum(0).clamp(min=1)
    return weights


def mixture_log_probs(log_probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(R, N, C) member log-probabilities, (R,) weights summing to 1 -> (N, C) log of the
    weighted probability mean (zero-weight members drop out exactly)."""
    return torch.logsumexp(log_probs + weights.clamp(min=1e-30).log()[:, None, None], 0)


def fit_weights(log_probs: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """Member weights w (on the simplex, softmax-parameterised) minimising the NLL of the
    probability mean sum_r w_r p_r on out-of-fold labels. -> (R,) weights."""
    theta = torch.zeros(log_probs.shape[0], requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.nll_loss(mixture_log_probs(log_probs, theta.softmax(0)), labels)
        loss.backward()
        return loss
    opt.step(closure)
    return theta.detach().softmax(0)


def greedy_selection(log_probs: torch.Tensor, labels: torch.Tensor, rounds: int = 20,
                     metric: str = "nll") -> torch.Tensor:
    """Ensemble selection from libraries of models, Caruana, Niculescu-Mizil, Crew & Ksikes,
    ICML 2004: start from the best single member, then repeatedly add (with replacement) the
    member whose addition most improves ``metric`` ('nll' or 'error') of the probability mean;
    a member's weight is how often it was picked. Keeps the best ensemble seen over ``rounds``.
    -> (R,) weights summing to 1."""
    if metric not in ("nll", "error"):
        raise ValueError(f"greedy_selection: metric must be 'nll' or 'error', got {metric!r}")
    r = log_probs.shape[0]

    def score(counts: torch.Tensor) -> float:
        mixed = mixture_log_probs(log_probs, counts / counts.sum())
        if metric == "nll":
            return F.nll_loss(mixed, labels).item()
        return (mixed.argmax(1) != labels).float().mean().item()

    counts = torch.zeros(r)
    best_counts, best = None, float("inf")
    for _ in range(rounds):
        trials = []
        for i in range(r):
            c = counts.clone()
            c[i] += 1
            trials.append((score(c), i))
        s, i = min(trials)  # ties go to the lower index: deterministic
        counts[i] += 1
        if s < best - 1e-12:
            best, best_counts = s, counts.clone()
    return best_counts / best_counts.sum()
