"""The teachers' ensemble and the soft targets distillation learns from.

``Ensemble`` averages the teachers' probabilities by default (``mean_logits`` on request).
For cached distillation every teacher's logits on K stored views of every image are computed
once (through its frozen-trunk cache when it has one) and combined per image by the teachers
allowed to label it (``combine_view_targets``, ``oof_teacher_mask``): the default teachers
trained on every image, so all of them label every image (in-sample targets); fold teachers
label only the images they never trained on. The default views are the mixed views of
``toolkit/mixviews.py`` (which calls ``members_view_logits`` for the plain image and its
mirror); the flip/shift views (``--view-kind shift``) and their options (``--calibrate``,
``--ensemble-weights``) are handled here.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .augment import apply_views, sample_view_params
from .backbones import TeacherError
from .ensemble_fit import fit_weights, greedy_selection, recipe_groups, recipe_oof_log_probs, recipe_weight_matrix
from .splits import teacher_saw, val_seen_by_teachers
from .fastpass import frozen_runner
from .teachers import TEACHER_FILE, Teacher, find_teacher_folders, load_teacher, predict_logits, teacher_runner
from .trunk import (TrunkSplit, own_trunk_blob, rebuild_own_trunk_cache, stored_trunk_features, trunk_cache_path,
                    trunk_identity, view_trunk_features)


class Ensemble(nn.Module):
    """Combines teachers into one predictor; forward returns log-probabilities (B, C).

    The default averages probabilities: cross-entropy is linear in the target, so the sum of
    KLs to each teacher equals (up to a constant) the KL to the probability-mean ensemble;
    distilling from the mean is distilling from all teachers at once (big_vision's distill
    trainer makes the same point). 'mean_logits' (a geometric mean) is offered too.
    """

    def __init__(self, teachers: list[Teacher], combine: str = "mean_probs",
                 weights: list[float] | None = None, temperature: float = 1.0):
        super().__init__()
        if not teachers:
            raise TeacherError("ensemble needs at least one teacher (none found)")
        classes = teachers[0].classes
        for t in teachers[1:]:
            if t.classes != classes:
                raise TeacherError(f"{getattr(t, 'folder', t.model_name)}: classes {t.classes} differ "
                                   f"from the first teacher's {classes}")
        if combine not in ("mean_probs", "mean_logits"):
            raise TeacherError(f"unknown ensemble combination {combine!r}")
        w = torch.tensor(weights if weights is not None else [1.0] * len(teachers), dtype=torch.float32)
        if len(w) != len(teachers) or (w < 0).any() or w.sum() <= 0:
            raise TeacherError(f"ensemble weights {weights} do not fit {len(teachers)} teachers")
        self.teachers = nn.ModuleList(teachers)
        self.classes, self.combine = list(classes), combine
        self.register_buffer("weights", w / w.sum(), persistent=False)
        self.temperature = float(temperature)

    def member_logits(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B, 3, 100, 100) -> (M, B, C) raw logits of every teacher."""
        return torch.stack([t(rgb).float() for t in self.teachers])

    def combine_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(M, B, C) member logits -> (B, C) ensemble log-probabilities."""
        w = self.weights.view(-1, 1, 1)
        if self.combine == "mean_logits":
            return ((w * logits).sum(0) / self.temperature).log_softmax(-1)
        log_p = logits.log_softmax(-1) + w.log()
        mixed = torch.logsumexp(log_p, 0)  # log sum_m w_m p_m
        return (mixed / self.temperature).log_softmax(-1)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.combine_logits(self.member_logits(rgb))


def load_ensemble(folders: list[str | Path] | None = None, root: str | Path = "teachers",
                  device: str | torch.device = "cpu", **kwargs) -> Ensemble:
    """The ensemble of ``folders`` (default: every teacher folder under ``root``); ``kwargs``
    go to Ensemble (combine, weights, temperature)."""
    folders = list(folders) if folders else find_teacher_folders(root)
    if not folders:
        raise TeacherError(f"{root}: no teachers found (no folder with a {TEACHER_FILE}; train some with "
                           "train_teacher.py, or pass --teachers DIR ...)")
    return Ensemble([load_teacher(f, device) for f in folders], **kwargs)


def fit_temperature(log_probs: torch.Tensor, labels: torch.Tensor, steps: int = 200) -> float:
    """Temperature T minimising the NLL of softmax(log_probs / T) on held-out labels."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(log_probs / log_t.exp(), labels)
        loss.backward()
        return loss
    opt.step(closure)
    return float(log_t.detach().exp())


@torch.no_grad()
def teacher_view_logits(teacher: Teacher, rgb_u8: torch.Tensor, view_params: torch.Tensor,
                        fingerprint: str = "", batch_size: int = 256,
                        device: str | torch.device = "cpu", only_views: list[int] | None = None,
                        images: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
    """One teacher's logits on K views of every image: (N, K, 3) params -> (N, K, C) float32
    (or (N, len(only_views), C) for a subset of the views). With ``images`` (indices), only
    those rows are computed; the others are left 0 (for rows the caller masks out anyway).

    When the teacher was trained on cached frozen-trunk features of these very views, or its
    trunk's ``features`` (N, K, C', h, w) of them are given, only its trainable part runs on
    them: the trunk's cost is paid once.
    """
    teacher.to(device).eval()
    if features is None:
        features = stored_trunk_features(teacher, view_params, fingerprint)
    if only_views is not None:
        view_params = view_params[:, only_views]
        features = features[:, only_views] if features is not None else None
    n_all, k = view_params.shape[:2]
    if images is not None:
        view_params, rgb_u8 = view_params[images], rgb_u8[images]
        features = features[images] if features is not None else None
    n = view_params.shape[0]
    out = torch.empty((n, k, len(teacher.classes)))
    if features is not None:
        split = TrunkSplit(teacher.backbone, teacher.config["frozen_stages"]).eval()
        flat = features.flatten(0, 1)
        head = frozen_runner(split.head_module(), flat[:4].float().to(device),
                             f"{getattr(teacher, 'folder', teacher.model_name)} (head)", device) if len(flat) else None
        logits = [head(flat[i:i + batch_size].float().to(device)).float().cpu()
                  for i in tqdm(range(0, n * k, batch_size),
                                desc=f"targets {Path(getattr(teacher, 'folder', '')).name} (cached trunk)",
                                leave=False)]
        out = torch.cat(logits).view(n, k, -1) if logits else out
    elif n:
        run = teacher_runner(teacher, rgb_u8, device)
        for j in range(k):
            for i in tqdm(range(0, n, batch_size), desc=f"targets view {j + 1}/{k}", leave=False):
                views = apply_views(rgb_u8[i:i + batch_size], view_params[i:i + batch_size, j].long())
                out[i:i + batch_size, j] = run(views.to(device)).float().cpu()
    if images is None:
        return out
    full = torch.zeros((n_all, k, len(teacher.classes)))
    full[images] = out
    return full


def identity_view_logits(teacher: Teacher, rgb_u8: torch.Tensor, fingerprint: str = "",
                         batch_size: int = 256, device: str | torch.device = "cpu",
                         images: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 3, 100, 100) uint8 -> (N, C) logits on the plain images (only rows ``images`` when
    given, in that order); reuses the teacher's frozen-trunk cache when it holds these very
    images (same data fingerprint)."""
    cfg = getattr(teacher, "config", {})
    if cfg.get("trunk_cache_key") and fingerprint:
        params = sample_view_params(len(rgb_u8), cfg["views"], cfg["max_shift"], cfg["seed"])
    else:
        params = torch.zeros((len(rgb_u8), 1, 3), dtype=torch.int8)  # view 0 is the identity
    logits = teacher_view_logits(teacher, rgb_u8, params, fingerprint, batch_size, device, only_views=[0],
                                 images=images)[:, 0]
    return logits if images is None else logits[images]


def combine_view_targets(member_logits: torch.Tensor, weights: torch.Tensor,
                         mask: torch.Tensor | None = None, combine: str = "mean_probs") -> torch.Tensor:
    """Soft targets: (M, N, K, C) member logits -> (N, K, C) ensemble probabilities.

    Per image, the ensemble (as ``Ensemble`` combines, at temperature 1) of the teachers that
    ``mask`` (M, N) bool allows to label it (None: all), their ``weights`` (M,), or per image
    (M, N), renormalised over those teachers; the others get zero weight.
    """
    m, n = member_logits.shape[:2]
    if mask is None:
        mask = torch.ones(m, n, dtype=torch.bool)
    w = (weights.float() if weights.dim() == 2 else weights.float().view(-1, 1)) * mask  # (M, N)
    w = w / w.sum(0, keepdim=True)
    if combine == "mean_logits":
        return (member_logits * w[..., None, None]).sum(0).softmax(-1)
    log_p = member_logits.log_softmax(-1) + w.clamp(min=1e-30).log()[..., None, None]
    return torch.logsumexp(log_p, 0).softmax(-1)


def oof_teacher_mask(teachers: list[Teacher], folds: torch.Tensor,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    """(M, N) bool: which teachers label each image.

    Soft labels a teacher gives its own training images are over-confident, so each image is
    labelled by the teachers that never trained on it (out-of-fold targets); an image every
    teacher trained on falls back to all of them. Pass ``labels`` so that each teacher's own
    k-fold (from its config) is used, whatever ``folds`` the caller split with.
    """
    mask = torch.stack([~teacher_saw(t, folds, labels) for t in teachers])
    mask[:, ~mask.any(0)] = True
    return mask


@torch.no_grad()
def members_view_logits(teachers: list[Teacher], rgb_u8: torch.Tensor, view_params: torch.Tensor,
                        fingerprint: str, needed: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """(M, N, K, C) logits of every teacher on K views of the images it labels (``needed``: (M, N)
    bool; other rows 0).

    A teacher whose own trunk cache holds exactly these views runs its head on it. Teachers with a
    frozen trunk but other views (the student trains on more views than the teachers did) share
    one pass of that trunk per view and recipe (``trunk.view_trunk_features``: the fold teachers
    of a recipe have one frozen trunk; each view is cached on disk once); the rest run whole.
    """
    out: list[torch.Tensor | None] = [None] * len(teachers)
    groups: dict[str, tuple] = {}  # trunk identity digest -> (its hash, lead's TrunkSplit, member indices)
    for t in teachers:  # missing own trunk caches first (once per recipe: its fold teachers share the file)
        rebuild_own_trunk_cache(t, rgb_u8, view_params, fingerprint, device)
    for m, t in enumerate(teachers):
        frozen = getattr(t, "config", {}).get("frozen_stages", 0)
        if frozen and fingerprint and stored_trunk_features(t, view_params, fingerprint) is None:
            split = TrunkSplit(t.backbone, frozen).eval()
            identity = trunk_identity(t.prepare, split, fingerprint, channels=rgb_u8.shape[1])
            groups.setdefault(identity.hexdigest(), (identity, split, []))[2].append(m)
        else:
            out[m] = teacher_view_logits(t, rgb_u8, view_params, fingerprint, device=device,
                                         images=needed[m].nonzero().flatten())
    for identity, split, members in groups.values():  # one recipe's trunk at a time: (N, K, C', h, w) in memory
        lead = teachers[members[0]]
        features = view_trunk_features(identity, lead.to(device), split, rgb_u8, view_params,
                                       own=own_trunk_blob(lead, fingerprint), device=device)
        for m in members:
            out[m] = teacher_view_logits(teachers[m], rgb_u8, view_params, fingerprint, device=device,
                                         images=needed[m].nonzero().flatten(), features=features)
        del features
    return torch.stack(out)


@torch.no_grad()
def members_identity_logits(teachers: list[Teacher], rgb_u8: torch.Tensor, fingerprint: str = "",
                            images: torch.Tensor | None = None, batch_size: int = 256,
                            device: str | torch.device = "cpu") -> torch.Tensor:
    """(M, n, C) logits of every teacher on the plain images (rows ``images`` if given).

    Teachers trained with the same frozen trunk (same trunk_cache_key, and bit-identical frozen
    weights, which is checked) share one trunk pass when no trunk cache is on disk: the trunk is
    most of a teacher's cost, so a k-fold ensemble costs about one teacher plus k heads.
    """
    out: list[torch.Tensor | None] = [None] * len(teachers)
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(teachers):
        key = getattr(t, "config", {}).get("trunk_cache_key")
        if key and not trunk_cache_path(key).is_file():
            groups.setdefault(key, []).append(i)
        else:
            out[i] = identity_view_logits(t, rgb_u8, fingerprint, batch_size, device, images)
    sel = rgb_u8 if images is None else rgb_u8[images]
    for members in groups.values():
        splits = [TrunkSplit(teachers[m].backbone, teachers[m].config["frozen_stages"]).eval() for m in members]
        first = [p for p in splits[0].trunk_parameters()]
        shared = [m for m, s in zip(members, splits)
                  if all(torch.equal(a, b) for a, b in zip(first, s.trunk_parameters()))]
        for m in set(members) - set(shared):  # trunks differ after all: run it in full
            out[m] = identity_view_logits(teachers[m], rgb_u8, fingerprint, batch_size, device, images)
        lead = teachers[shared[0]].to(device).eval()
        heads = [[] for _ in shared]
        for i in tqdm(range(0, len(sel), batch_size), desc=f"shared trunk ({len(shared)} teachers)", leave=False):
            features = splits[0].trunk(lead.prepare(sel[i:i + batch_size].to(device)))
            for h, m in enumerate(shared):
                heads[h].append(splits[members.index(m)].head(features).float().cpu())
        for h, m in enumerate(shared):
            out[m] = torch.cat(heads[h])
    return torch.stack(out)


# ----------------------------------------------------------------------------------------
# What distillation learns from, and the record of how good it was
# ----------------------------------------------------------------------------------------
def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    return (logits.argmax(1) == labels).float().mean().item() if len(labels) else None


def teacher_records(teachers: list[Teacher], val_logits: torch.Tensor, val_labels: torch.Tensor) -> list[dict]:
    """Provenance of each teacher: folder, model, its own metrics, its accuracy on the
    student's val fold (``val_logits``: (M, n_val, C))."""
    return [{"folder": t.folder, "model": t.model_name, "own_metrics": t.metrics,
             "val_acc_on_student_val": _accuracy(val_logits[m], val_labels) if len(val_labels) else None}
            for m, t in enumerate(teachers)]


def view_soft_targets(ensemble: Ensemble, data, view_params: torch.Tensor, folds: torch.Tensor,
                      train_idx: torch.Tensor, val_idx: torch.Tensor, oof: bool = True,
                      calibrate: bool = False, device: str | torch.device = "cpu",
                      weighting: str = "equal") -> tuple[torch.Tensor, dict, list[dict]]:
    """Cached distillation's targets: the ensemble on K fixed views of every image.

    data: CourseData; view_params: (N, K, 3) -> ((N, K, C) float16 probabilities, metrics,
    teacher records). With ``oof``, each image is labelled by the teachers that never trained
    on it (``oof_teacher_mask``). ``weighting`` 'fit' or 'greedy' weighs the teachers' recipes
    (ensemble_fit.fit_weights / greedy_selection) and ``calibrate`` fits the ensemble's
    temperature, both on the out-of-fold predictions of the *training* images only: the val
    fold is never used to fit anything, so its accuracy stays an honest estimate.
    """
    if weighting not in ("equal", "fit", "greedy"):
        raise TeacherError(f"ensemble weighting must be equal, fit or greedy, got {weighting!r}")
    t0 = time.time()
    teachers, labels = list(ensemble.teachers), data.labels
    mask = oof_teacher_mask(teachers, folds, labels) if oof else torch.ones(len(teachers), len(data), dtype=torch.bool)
    # Each teacher runs only on the images it labels (and the val fold): k times less work
    # with out-of-fold fold teachers. Rows it does not label stay 0 and are masked out.
    needed = mask.clone()
    needed[:, val_idx] = True
    member_logits = members_view_logits(teachers, data.rgb, view_params, data.fingerprint,
                                        needed, device)  # (M, N, K, C)
    # Images some teacher never saw: their identity-view predictions are out-of-fold, the only
    # ones weights and temperature may be fitted on.
    oof_images = ~mask.all(0)                                                            # (N,)
    fit_rows = train_idx[oof_images[train_idx]]
    weights, metrics = ensemble.weights, {}
    if weighting != "equal":
        groups = recipe_groups(teachers)
        oof_lp, covered = recipe_oof_log_probs(member_logits[:, fit_rows, 0], mask[:, fit_rows], groups)
        rows = covered.nonzero().flatten()
        if not len(rows):
            raise TeacherError(f"--ensemble-weights {weighting}: no training image has an out-of-fold "
                               "prediction from every recipe (are these fold teachers?)")
        fit = fit_weights if weighting == "fit" else greedy_selection
        recipe_w = fit(oof_lp[:, rows], labels[fit_rows][rows])
        weights = recipe_weight_matrix(groups, recipe_w, mask)                                # (M, N)
        metrics["recipe_weights"] = {k: round(float(w), 4) for k, w in zip(groups, recipe_w)}
    # Per image, the ensemble of the teachers allowed to label it: zero weight elsewhere.
    targets = combine_view_targets(member_logits, weights, mask, ensemble.combine)            # (N, K, C)
    if calibrate and len(fit_rows):
        ensemble.temperature = fit_temperature(targets[fit_rows, 0].clamp(min=1e-30).log(), labels[fit_rows])
        targets = (targets.clamp(min=1e-30).log() / ensemble.temperature).softmax(-1)
        metrics["temperature"] = round(ensemble.temperature, 4)
    targets = targets.half()
    val_lp = targets[val_idx, 0].float().clamp(min=1e-30).log()
    metrics.update({"ensemble_val_acc": _accuracy(val_lp, labels[val_idx]),
                    "ensemble_val_nll": F.nll_loss(val_lp, labels[val_idx]).item() if len(val_idx) else None,
                    "target_train_acc": _accuracy(targets[train_idx, 0], labels[train_idx]),
                    "oof_fraction": float(oof_images[train_idx].float().mean()),
                    "val_seen_by_teachers": val_seen_by_teachers(teachers, folds, labels, val_idx),
                    "target_seconds": round(time.time() - t0, 1)})
    return targets, metrics, teacher_records(teachers, member_logits[:, val_idx, 0], labels[val_idx])


def ensemble_on_val(ensemble: Ensemble, data, folds: torch.Tensor, val_idx: torch.Tensor,
                    device: str | torch.device = "cpu") -> tuple[dict, list[dict]]:
    """Online distillation's record: the ensemble and each teacher on the val fold's plain images."""
    teachers, y = list(ensemble.teachers), data.labels[val_idx]
    if not len(val_idx):
        return {"ensemble_val_acc": None}, teacher_records(teachers, torch.empty(len(teachers), 0), y)
    member = torch.stack([predict_logits(t, data.rgb[val_idx], device=device) for t in teachers])
    return ({"ensemble_val_acc": _accuracy(ensemble.combine_logits(member), y),
             "val_seen_by_teachers": val_seen_by_teachers(teachers, folds, data.labels, val_idx)},
            teacher_records(teachers, member, y))
