"""Splits and sampling: stratified k-folds (seeded, deterministic), which images a teacher
trained on (from the k-fold its config records), and a class-balanced sampler that shards each
epoch's draw over DDP ranks."""
from __future__ import annotations

import logging
import random

import torch

from .data import DataError

log = logging.getLogger(__name__)


def fold_split(labels: torch.Tensor, k: int, seed: int, val_fold: int, exclude_folds=()
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(folds, train_idx, val_idx): the stratified k-fold of ``labels``; val is ``val_fold``
    (-1: none, train on everything), train is every other fold not in ``exclude_folds``."""
    folds = stratified_folds(labels, k, seed)
    train_idx = (~torch.isin(folds, torch.tensor([val_fold, *exclude_folds]))).nonzero().flatten()
    val_idx = (folds == val_fold).nonzero().flatten()
    return folds, train_idx, val_idx


def stratified_folds(labels: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Assign each sample a fold id in [0, k), stratified by class and deterministic in seed.

    Within each class the samples are shuffled and dealt round-robin from a random starting
    fold, so every fold gets floor or ceil of n_c / k of each class; classes with fewer
    than k images simply leave some folds without them (no crash).
    """
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2, got {k}")
    rng = random.Random(seed)
    folds = torch.empty(len(labels), dtype=torch.int64)
    offset = 0
    for c in sorted(set(labels.tolist())):
        idx = [i for i, y in enumerate(labels.tolist()) if y == c]
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            folds[i] = (offset + j) % k
        offset += len(idx)  # spread classes' remainders over different folds
    return folds


def stratified_split(labels: torch.Tensor, val_fraction: float = 0.2, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic stratified (train_idx, val_idx): fold 0 of round(1/val_fraction) folds,
    so the val split is always one fold of the k-fold with the same seed."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    folds = stratified_folds(labels, max(2, round(1 / val_fraction)), seed)
    return (folds != 0).nonzero().flatten(), (folds == 0).nonzero().flatten()


def class_balanced_weights(labels: torch.Tensor, power: float = 0.0) -> torch.Tensor:
    """Per-sample weights so that class c is drawn with probability proportional to n_c**power.

    power=0: every class equally often; power=1: natural frequencies; 0.5: square-root."""
    counts = torch.bincount(labels).double()
    per_class = counts.clamp(min=1) ** (power - 1.0)
    return per_class[labels]


class ClassBalancedSampler(torch.utils.data.Sampler):
    """Draws ``num_samples`` indices per epoch with class probabilities proportional to
    n_c**power (with replacement), identically on every rank, each rank keeping its slice.

    ``indices`` restricts sampling to a subset (e.g. the train split); set_epoch() reseeds,
    so a resumed run sees the same sequence as an uninterrupted one.
    """

    def __init__(self, labels: torch.Tensor, indices: torch.Tensor | None = None,
                 power: float = 0.0, num_samples: int | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.indices = torch.arange(len(labels)) if indices is None else torch.as_tensor(indices)
        self.weights = class_balanced_weights(labels[self.indices], power)
        total = num_samples if num_samples is not None else len(self.indices)
        self.per_rank = total // world_size
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        drawn = torch.multinomial(self.weights, self.per_rank * self.world_size, True, generator=g)
        mine = drawn[self.rank::self.world_size]
        return iter(self.indices[mine].tolist())


def check_split(data, train_idx: torch.Tensor, val_idx: torch.Tensor, val_fold: int,
                every_class: bool) -> None:
    """DataError unless the split can train a classifier: some training images of at least two
    classes (``every_class``: of every class), and images in the held-out fold when there is one."""
    where = data.folder or "data"
    present = sorted(set(data.labels[train_idx].tolist()))
    if len(train_idx) == 0:
        raise DataError(f"{where}: no training images left (the held-out and excluded folds hold all "
                        f"{len(data)}); use fewer --exclude-folds or another --fold")
    if len(set(data.labels.tolist())) < 2:
        raise DataError(f"{where}: only one class ({data.classes[int(data.labels[0])]!r}); "
                        "a classifier needs images of at least two classes")
    if len(present) < 2:
        raise DataError(f"{where}: the training split holds only class {data.classes[present[0]]!r}")
    if every_class:
        counts = torch.bincount(data.labels, minlength=len(data.classes))
        missing = [c for i, c in enumerate(data.classes) if i not in present]
        if missing:
            c = data.classes.index(missing[0])
            raise DataError(f"{where}: class {missing[0]!r} has no training images ({int(counts[c])} in all, "
                            f"every one in the held-out or excluded folds)")
    if val_fold >= 0 and len(val_idx) == 0:
        raise DataError(f"{where}: held-out fold {val_fold} holds no images ({len(data)} images in all)")


def teacher_saw(teacher, folds: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) bool: which images ``teacher`` trained on, from the k-fold recorded in its config.

    With ``labels``, the teacher's own k-fold is recomputed from its config's ``folds`` and
    ``seed`` (stratified_folds is deterministic), so a caller using another k or seed for its
    own split (``folds``) still gets the images the teacher really trained on.
    """
    cfg = getattr(teacher, "config", {})
    if labels is not None and "folds" in cfg and "seed" in cfg:
        folds = stratified_folds(labels, int(cfg["folds"]), int(cfg["seed"]))
    held_out = set(cfg.get("exclude_folds", [])) | {cfg.get("fold", -1)}
    return ~torch.isin(folds, torch.tensor(sorted(held_out)))


def check_teachers_held_out(teachers: dict, folds: torch.Tensor, labels: torch.Tensor, val_fold: int) -> None:
    """Refuse (DataError naming the folder) the first of ``teachers`` ({folder: teacher}) that
    trained on any image of fold ``val_fold``: its score there would be no held-out figure."""
    val_idx = (folds == val_fold).nonzero().flatten()
    for folder, teacher in teachers.items():
        if teacher_saw(teacher, folds, labels)[val_idx].any():
            raise DataError(f"{folder}: trained on images of fold {val_fold} of the {int(folds.max()) + 1}-fold split")


def val_seen_by_teachers(teachers: list, folds: torch.Tensor, labels: torch.Tensor,
                         val_idx: torch.Tensor) -> int:
    """How many val images some teacher trained on (each teacher's own k-fold, from its config),
    with a warning when there are any: then the student's val accuracy is no held-out estimate
    (e.g. nested teachers made with one split seed, the student split with another)."""
    if not len(val_idx) or not teachers:
        return 0
    seen = int(torch.stack([teacher_saw(t, folds, labels)[val_idx] for t in teachers]).any(0).sum())
    if seen:
        log.warning(f"warning: {seen} of {len(val_idx)} val images were training images of some teacher: the "
                    "student's val accuracy is not a held-out estimate (teachers split with another --split-seed?)")
    return seen


def load_held_out(teacher_folders: list[str], data_dir: str, folds: int, fold: int, fold_flag: str = "--fold"):
    """The set-up of a held-out score (scripts/heldout_teachers.py, target_input.py): the flags
    checked (ConfigError), every teacher loaded before the data is read, and a teacher that trained
    on an image of fold ``fold`` of the seed-0 ``folds``-fold split refused.
    -> ({folder: teacher}, data, val_idx)."""
    from .config import ConfigError
    from .data import load_course_folder
    from .teachers import load_teacher
    if folds < 2:
        raise ConfigError(f"--folds {folds}: a split needs at least 2 folds")
    if not 0 <= fold < folds:
        raise ConfigError(f"{fold_flag} {fold}: a {folds}-fold split has folds 0..{folds - 1}")
    teachers = {folder: load_teacher(folder) for folder in teacher_folders}
    data = load_course_folder(data_dir, progress=False)
    fold_ids, _, val_idx = fold_split(data.labels, folds, 0, fold)
    check_teachers_held_out(teachers, fold_ids, data.labels, fold)
    return teachers, data, val_idx
