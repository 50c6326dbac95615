"""Distillation and classification losses: small pure functions of logits and targets.

Conventions shared by every function here:
  * ``student_logits`` are raw (B, C) logits with gradients; teacher inputs are targets and
    are detached (no gradient ever flows into a teacher).
  * Teachers are ensembles, so they are given as probabilities at temperature 1
    (``teacher_probs``, rows summing to 1) or, for LS-KD, as their logarithm. Softening to a
    temperature T renormalises p**(1/T), i.e. softmax(log p / T): exactly what softmax(z / T)
    would give for a single teacher with logits z, since log p = z - logsumexp(z).
  * Reductions are batch means. Labels of -1 mean "unlabelled" and are ignored by every
    cross-entropy term (its mean is over the labelled rows only; 0 if there are none).
  * The distillation losses return a dict {'loss': total, <components>}, like timm's
    distillation task (loss, task_loss, kd_loss); components are reported unweighted, and
    the docstring says how they are combined into 'loss'.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1


def soften_probs(probs: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Teacher probabilities at temperature T: p_i**(1/T) / sum_j p_j**(1/T).

    Computed as softmax(log p / T); zero probabilities stay exactly zero at any T.
    """
    if T <= 0:
        raise ValueError(f"temperature must be > 0, got {T}")
    probs = probs.detach().float()
    if T == 1.0:
        return probs / probs.sum(dim=1, keepdim=True)
    return torch.softmax(torch.log(probs) / T, dim=1)


def _masked_ce(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
               ) -> torch.Tensor:
    """Mean CE over rows whose label is not -1; a graph-connected 0 when there are none."""
    labels = labels.long()
    n_valid = (labels != IGNORE_INDEX).sum()
    if n_valid == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX,
                           label_smoothing=label_smoothing)


def kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
            labels: torch.Tensor | None = None, T: float = 2.0, alpha: float = 0.0
            ) -> dict[str, torch.Tensor]:
    """Knowledge distillation, Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
    Neural Network" (arXiv:1503.02531):

        L = alpha * CE(y, s) + (1 - alpha) * T^2 * KL(p_T || softmax(s / T))

    where p_T = soften_probs(teacher_probs, T) and KL(p || q) = sum_i p_i (log p_i - log q_i),
    averaged over the batch. The T^2 keeps the soft-target gradients' scale independent of T.
    ``labels``: class ids (B,), CE over the rows with label != -1, or label distributions (B, C)
    such as a mixed view's hard label; None only when alpha == 0.

    Returns {'loss': L, 'ce': CE (0 when alpha == 0 and labels is None), 'kd': T^2 * KL}.
    """
    s = student_logits.float()
    ce = _hard_term(s, labels, alpha, "kd_loss")
    p_t = soften_probs(teacher_probs, T)
    # kl_div with a probability target uses xlogy, so zero teacher probabilities are fine.
    kd = F.kl_div(F.log_softmax(s / T, dim=1), p_t, reduction="batchmean") * (T * T)
    return {"loss": alpha * ce + (1.0 - alpha) * kd, "ce": ce, "kd": kd}


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation between matching rows of a and b, (N, D) -> (N,).

    The denominator is clamped at eps, so identical rows give exactly 1 and constant rows 0.
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(eps)


def dist_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, T: float = 1.0,
              beta: float = 1.0, gamma: float = 1.0, labels: torch.Tensor | None = None,
              alpha: float = 0.0) -> dict[str, torch.Tensor]:
    """DIST, Huang, You, Wang, Qian & Xu 2022, "Knowledge Distillation from A Stronger
    Teacher" (NeurIPS 2022, arXiv:2205.10536). With Y_s = softmax(s / T) and
    Y_t = soften_probs(teacher_probs, T), both (B, C), and rho the Pearson correlation:

        inter = 1 - (1/B) sum_i rho(Y_s[i, :], Y_t[i, :])    (inter-class relation, per sample)
        intra = 1 - (1/C) sum_j rho(Y_s[:, j], Y_t[:, j])    (intra-class relation, per class)
        DIST  = T^2 * (beta * inter + gamma * intra)
        L     = alpha * CE(y, s) + (1 - alpha) * DIST

    The paper trains on CE + beta * inter + gamma * intra (its alpha 1): that is alpha = 0.5 here,
    with the loss halved. ``labels``: class ids (B,) (-1 ignored) or label distributions (B, C)
    such as mixed hard labels; None only when alpha == 0.

    Returns {'loss': L, 'inter': inter, 'intra': intra, 'ce': CE} (inter/intra without T^2 or
    weights; CE 0 when labels is None). With a batch of one the intra term is the constant 1 (a
    single value has no correlation).
    """
    s = student_logits.float()
    ce = _hard_term(s, labels, alpha, "dist_loss")
    y_s = torch.softmax(s / T, dim=1)
    y_t = soften_probs(teacher_probs, T)
    inter = 1.0 - _pearson_rows(y_s, y_t).mean()
    intra = 1.0 - _pearson_rows(y_s.t(), y_t.t()).mean()
    dist = (T * T) * (beta * inter + gamma * intra)
    return {"loss": alpha * ce + (1.0 - alpha) * dist, "inter": inter, "intra": intra, "ce": ce}


def _hard_term(s: torch.Tensor, labels: torch.Tensor | None, alpha: float, loss: str) -> torch.Tensor:
    """The CE of ``loss``'s alpha * CE + (1 - alpha) * soft term, after checking alpha is in [0, 1]
    and labels are given when alpha > 0; a graph-connected 0 when labels is None."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha > 0 and labels is None:
        raise ValueError(f"{loss}: labels are required when alpha > 0")
    return hard_label_ce(s, labels) if labels is not None else s.sum() * 0.0


def hard_label_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE against class ids (B,), rows with -1 ignored, or against label distributions (B, C)
    (mixed hard labels lam * y_i + (1 - lam) * y_j of a CutMix or mixup view)."""
    return soft_cross_entropy(logits, labels) if labels.dim() == 2 else _masked_ce(logits, labels)


def standardize_logits(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-row z-score (z - mean) / (std + eps), std with Bessel's correction as in the
    reference code of Sun et al. 2024. Invariant to z -> a * z + b for any a > 0 and b."""
    z = z.float()
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)


def lskd_loss(student_logits: torch.Tensor, teacher_logits_or_log_probs: torch.Tensor,
              T: float = 2.0) -> dict[str, torch.Tensor]:
    """Logit-standardised KD, Sun, Ren, Li, Wang & Cao 2024, "Logit Standardization in
    Knowledge Distillation" (CVPR 2024, arXiv:2403.01427). With Z(z) = (z - mean z) /
    (std z + eps) per sample:

        L = T^2 * KL(softmax(Z(t) / T) || softmax(Z(s) / T)),  batch mean.

    The teacher may be given as logits or as log-probabilities (e.g. the log of an
    ensemble's mean probabilities): log p = z - logsumexp(z) differs from the logits by a
    per-sample constant, which Z removes. -inf entries (log of a zero probability) are
    replaced by the row's smallest finite value so that mean and std stay finite.

    Returns {'loss': L, 'kl': KL} (KL without the T^2).
    """
    t = teacher_logits_or_log_probs.detach().float()
    if not torch.isfinite(t).all():
        finite_min = torch.where(torch.isfinite(t), t, torch.full_like(t, float("inf")))
        finite_min = finite_min.min(dim=1, keepdim=True).values
        t = torch.where(torch.isneginf(t), finite_min.expand_as(t), t)
    log_q = F.log_softmax(standardize_logits(student_logits) / T, dim=1)
    p = torch.softmax(standardize_logits(t) / T, dim=1)
    kl = F.kl_div(log_q, p, reduction="batchmean")
    return {"loss": kl * (T * T), "kl": kl}


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with soft targets (mixup / cutmix / distilled labels):

        L = -(1/B) sum_i sum_c p_ic * log softmax(s_i)_c
    """
    return -(target_probs.detach().float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def label_smoothing_ce(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0
                       ) -> torch.Tensor:
    """Cross-entropy with label smoothing (Szegedy et al. 2016, "Rethinking the Inception
    Architecture for Computer Vision"): the target is (1 - eps) * onehot(y) + eps / C.

    A thin wrapper over F.cross_entropy(label_smoothing=smoothing, ignore_index=-1): the mean
    is over the rows with label != -1, and a batch with no labelled row gives 0 (not NaN).
    """
    return _masked_ce(logits, labels, label_smoothing=smoothing)
