"""The training engine shared by train_teacher.py and distill.py.

The loop under torchrun DDP (toolkit.distributed), AMP (CUDA only), warm-up + cosine schedule,
EMA weights, atomic checkpoints with step-exact resume, a non-finite-loss guard and one log row per
epoch; ``make_trainer`` and ``val_metrics`` are the set-up and the val metrics both scripts share.

Determinism: every step draws its randomness from a generator seeded by (seed, global step),
and every epoch's batch order from (seed, epoch); so a run resumed from any checkpoint
replays exactly the steps an uninterrupted run would have taken.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

from .config import parse_config
from .distributed import DistEnv, init_distributed
from .io import atomic_save, atomic_write_json
from .runlog import write_run_summary

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pth"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


class CheckpointError(RuntimeError):
    """--resume from a checkpoint that is unreadable or belongs to another run."""


class TrainingError(RuntimeError):
    """A run that earned no result (no training step): nothing is saved."""


# Config keys that do not change what a resumed run computes: where things are written or
# read from (the data's content is compared by fingerprint), the device, checkpoint cadence.
RESUME_IRRELEVANT = frozenset({"resume", "checkpoint_every", "device", "amp", "out", "work_dir", "data",
                               "arch", "teachers", "teachers_root", "report_dir", "keep_checkpoint", "recipe",
                               "member"})


# A teacher on a cached trunk trains on fixed views: its online-only augmentations cannot act there.
ONLINE_ONLY = frozenset({"trivial_augment", "mixup", "cutmix"})


def compared_config(config: dict) -> dict:
    """The part of a run's config that decides what it computes: not RESUME_IRRELEVANT, and for a
    teacher on a cached trunk (``trunk_cache``, ``frozen_stages`` > 0) not ONLINE_ONLY."""
    cached = bool(config.get("trunk_cache")) and (config.get("frozen_stages") or 0) > 0
    drop = RESUME_IRRELEVANT | (ONLINE_ONLY if cached else frozenset())
    return {k: v for k, v in config.items() if k not in drop}


def run_identity(config: dict, fingerprint: str) -> dict:
    """What a checkpoint must share with the run that resumes it (the model's parameter names
    and shapes are added by the Trainer)."""
    return {"data_fingerprint": fingerprint, "config": compared_config(config)}


# ----------------------------------------------------------------------------------------
# Seeds and run records
# ----------------------------------------------------------------------------------------
def start_run(config_cls, argv: list[str] | None = None):
    """How every training script starts -> (cfg, env, device): the config checked in full
    (flags, --config) before any work, the process group and device (DDP under torchrun),
    every RNG seeded."""
    cfg = parse_config(config_cls, argv)
    env, device = init_distributed(cfg.device)
    seed_everything(cfg.seed)
    return cfg, env, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int) -> torch.Generator:
    """Randomness of one training step, reproducible on resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)


def run_info(seed: int, fingerprint: str) -> dict:
    """Versions, seed and data fingerprint recorded in every run folder."""
    import timm
    import torchvision
    return {"seed": seed, "data_fingerprint": fingerprint, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "numpy": np.__version__, "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------
def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  final_fraction: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base lr, then cosine decay to final_fraction of it."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_trainer(model: nn.Module, cfg, out_dir: str | Path, sampler, env: DistEnv, device: torch.device,
                 desc: str, fingerprint: str | None = None) -> "Trainer":
    """The two scripts' shared set-up: the optimizer (timm's ``cfg.optimizer``, e.g. adamw or
    sgd = Nesterov momentum 0.9) at ``cfg.lr`` per 256 images, warm-up
    (``cfg.warmup_epochs``) + cosine over ``cfg.epochs`` epochs of ``sampler``'s batches, the
    Trainer with EMA and checkpoints, resumed from ``out_dir`` with ``cfg.resume`` (which must
    then hold a checkpoint of this run: the data ``fingerprint``, ``cfg`` and the model)."""
    steps_per_epoch = len(epoch_index_batches(sampler, 0, cfg.batch_size))
    # timm's factory: no weight decay on biases and norm parameters (1-d), frozen ones left out
    optimizer = create_optimizer_v2(model, cfg.optimizer, lr=cfg.lr * cfg.batch_size / 256,
                                    weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch))
    trainer = Trainer(model, optimizer, scheduler, out_dir, cfg.epochs, cfg.seed, env, device, cfg.ema_decay,
                      cfg.checkpoint_every, amp=cfg.amp, desc=desc,
                      identity=None if fingerprint is None else run_identity(dataclasses.asdict(cfg), fingerprint))
    if cfg.resume and env.is_main:
        if trainer.resume():
            log.info(f"resumed {out_dir} at epoch {trainer.epoch + 1}, step {trainer.global_step}")
        else:
            log.info(f"--resume: no {CHECKPOINT} in {out_dir}; starting from the first step")
    elif cfg.resume:
        trainer.resume()
    return trainer


@torch.no_grad()
def val_metrics(predict: Callable[[torch.Tensor], torch.Tensor], val_idx: torch.Tensor, labels: torch.Tensor,
                batch_size: int | None = None) -> dict:
    """Accuracy and NLL on the val fold ({} without one); ``predict(index batch)`` -> logits."""
    if len(val_idx) == 0:
        return {}
    batches = [val_idx] if batch_size is None else val_idx.split(batch_size)
    logits = torch.cat([predict(b).float().cpu() for b in tqdm(batches, desc="validate", unit="batch", leave=False)])
    y = labels[val_idx]
    return {"val_acc": (logits.argmax(1) == y).float().mean().item(), "val_nll": F.cross_entropy(logits, y).item()}


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------
class Trainer:
    """Epoch loop with EMA, checkpoints every ``checkpoint_every`` steps, and exact resume.

    ``epoch_batches(epoch)`` returns the epoch's list of batch index tensors (deterministic
    in the epoch); ``loss_fn(model, batch, generator)`` returns a dict with 'loss';
    ``evaluate(model)`` returns a metrics dict (run on the EMA weights when EMA is on).
    """

    def __init__(self, model: nn.Module, optimizer, scheduler, out_dir: str | Path, epochs: int,
                 seed: int, env: DistEnv = DistEnv(), device: torch.device = torch.device("cpu"),
                 ema_decay: float = 0.0, checkpoint_every: int = 200, amp: bool = False, desc: str = "train",
                 identity: dict | None = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.out_dir, self.epochs, self.seed, self.env, self.device = Path(out_dir), epochs, seed, env, device
        self.ema = ModelEmaV3(model, decay=ema_decay, use_warmup=True) if ema_decay > 0 else None
        self.checkpoint_every, self.desc = checkpoint_every, desc
        amp = amp and device.type == "cuda"  # fp16 autocast + loss scaling; CPU runs stay fp32
        self.amp_dtype = torch.float16 if amp else None
        self.scaler = torch.amp.GradScaler(device.type) if amp else None
        self.train_model = model
        if env.enabled:
            self.train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        # run_identity(...) + the trained model's parameter names and shapes: stored in every
        # checkpoint and compared on resume (None: not checked, for library use)
        self.identity = None if identity is None else {
            **identity, "model": [[k, list(v.shape)] for k, v in model.state_dict().items()]}
        self.epoch, self.step_in_epoch, self.global_step, self.history = 0, 0, 0, []
        self.epoch_sums, self.epoch_count = {}, 0  # running train-loss sums of the current epoch

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "epoch": self.epoch,
                 "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                 "history": self.history, "torch_rng": torch.get_rng_state(),
                 "epoch_sums": dict(self.epoch_sums), "epoch_count": self.epoch_count,
                 "run_identity": self.identity}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def save_checkpoint(self) -> None:
        if self.env.is_main:
            atomic_save(self.state_dict(), self.out_dir / CHECKPOINT)

    def remove_checkpoint(self) -> None:
        """Once the result is written, the training state is no longer needed."""
        if self.env.is_main:
            (self.out_dir / CHECKPOINT).unlink(missing_ok=True)

    def resume(self) -> bool:
        """Load the checkpoint of ``out_dir`` if there is one (False if none). CheckpointError if
        it cannot be read or, when this trainer has an identity, belongs to another run."""
        path = self.out_dir / CHECKPOINT
        if not path.is_file():
            return False
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
            if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "epoch"} <= state.keys():
                raise ValueError("not a training checkpoint")
        except Exception as err:  # truncated, corrupt, or some other file
            raise CheckpointError(f"{path}: checkpoint cannot be read ({type(err).__name__}: "
                                  f"{' '.join(str(err).split())[:200]}); delete it to start afresh") from None
        if self.identity is not None:
            problem = identity_mismatch(state.get("run_identity"), self.identity)
            if problem:
                raise CheckpointError(f"{path}: checkpoint belongs to another run ({problem}); "
                                      "resume with the same data and config, or delete it to start afresh")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.ema is not None and "ema" in state:
                self.ema.load_state_dict(state["ema"])
            if self.scaler is not None and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: checkpoint does not fit this model "
                                  f"({' '.join(str(err).split())[:200]})") from None
        torch.set_rng_state(state["torch_rng"].cpu())
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.history = state["global_step"], state["history"]
        # a run resumed mid-epoch reports that epoch's train losses over all its steps
        self.epoch_sums, self.epoch_count = dict(state.get("epoch_sums", {})), state.get("epoch_count", 0)
        return True

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    # -- loop -----------------------------------------------------------------------------
    def fit(self, epoch_batches: Callable[[int], list], loss_fn: Callable, evaluate: Callable) -> list[dict]:
        while self.epoch < self.epochs:
            batches = epoch_batches(self.epoch)
            self.model.train()
            if self.step_in_epoch == 0:
                self.epoch_sums, self.epoch_count = {}, 0
            t0 = time.time()
            bar = tqdm(batches[self.step_in_epoch:], desc=f"{self.desc} {self.epoch + 1}/{self.epochs}",
                       unit="batch", disable=not self.env.is_main, leave=False)
            for batch in bar:
                losses = self.train_step(batch, loss_fn)
                for k, v in losses.items():
                    self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v
                self.epoch_count += 1
                bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if self.checkpoint_every and self.global_step % self.checkpoint_every == 0:
                    self.save_checkpoint()
            metrics = {f"train_{k}": v / max(self.epoch_count, 1) for k, v in self.epoch_sums.items()}
            metrics.update(evaluate(self.eval_model) if self.env.is_main else {})
            metrics.update(epoch=self.epoch + 1, step=self.global_step, lr=self.scheduler.get_last_lr()[0],
                           seconds=round(time.time() - t0, 1))
            self.history.append(metrics)
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.epoch_sums, self.epoch_count = {}, 0
            self.save_checkpoint()
            if self.env.is_main:
                atomic_write_json(self.history, self.out_dir / "log.json")
                write_run_summary(self.history, self.out_dir, curve=self.epoch == self.epochs)  # summary.csv, PNG
                log.info(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        self.check_earned()
        return self.history

    def check_earned(self) -> None:
        """A result worth saving: at least one training step, finite weights. The callers save
        only after fit() returns, so a failure here leaves any previous output untouched."""
        if self.global_step == 0:
            raise TrainingError(f"{self.desc}: no training step was taken ({self.epochs} epoch(s) of 0 batches: "
                                "the training split is empty or smaller than a batch); nothing was saved")
        bad = [k for k, v in self.eval_model.state_dict().items()
               if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteLossError(f"{self.desc}: weights became non-finite ({bad[0]}"
                                     f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); nothing was saved")

    def train_step(self, batch, loss_fn: Callable) -> dict:
        generator = step_generator(self.seed, self.global_step)
        torch.manual_seed((self.seed * 7919 + self.global_step) % 2**63)  # dropout etc.
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            losses = loss_fn(self.train_model, batch, generator)
        loss = losses["loss"]
        if not torch.isfinite(loss).all():
            path = self.out_dir / CHECKPOINT
            kept = (f"the last good checkpoint is kept at {path} (resume with --resume after lowering --lr)"
                    if path.is_file() else "no checkpoint was written yet (--checkpoint-every)")
            lr = self.scheduler.get_last_lr()[0]
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at epoch {self.epoch + 1}, step {self.global_step}; "
                f"{kept}; learning rate {lr:.3g}; nothing was saved")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        self.global_step += 1
        self.step_in_epoch += 1
        return {k: float(v.detach()) for k, v in losses.items()}


def epoch_index_batches(sampler, epoch: int, batch_size: int) -> list[torch.Tensor]:
    """The sampler's draw for ``epoch`` chunked into index batches (last partial batch dropped
    when it is tiny, so BatchNorm never sees a batch of one)."""
    sampler.set_epoch(epoch)
    order = torch.tensor(list(iter(sampler)), dtype=torch.int64)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < max(2, batch_size // 4):
        batches.pop()
    return batches


def identity_mismatch(saved: dict | None, now: dict) -> str | None:
    """How a checkpoint's run identity differs from this run's, in a few words, or None."""
    if not saved:
        return "it records no run identity (written by an older version)"
    if saved.get("data_fingerprint") != now.get("data_fingerprint"):
        return (f"data fingerprint {saved.get('data_fingerprint')} != {now.get('data_fingerprint')}: "
                "the data changed")
    old, new = saved.get("config", {}), now.get("config", {})
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        k = changed[0]
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        return f"config {k} was {old.get(k)!r}, now {new.get(k)!r}{more}"
    if saved.get("model") != now.get("model"):
        return "the model's parameter names or shapes differ"
    return None


def finished_run_config(folder: str | Path) -> dict | None:
    """The recorded config of a run that finished in ``folder``, or None. A finished run wrote
    its config.yaml last and removed its checkpoint.pth (``--keep-checkpoint`` keeps it: then the
    checkpoint's own identity check applies); the data fingerprint is its config.yaml's key
    ``data_fingerprint`` (a teacher's) or that of its run_info.json (a student's)."""
    import yaml
    folder = Path(folder)
    if (folder / CHECKPOINT).is_file() or not (folder / "config.yaml").is_file():
        return None
    try:
        saved = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
        info = json.loads((folder / "run_info.json").read_text()) if (folder / "run_info.json").is_file() else {}
    except (OSError, ValueError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{folder / 'config.yaml'}: --resume: the finished run's config cannot be read; "
                              "run without --resume to start afresh, or use another folder")
    saved.setdefault("data_fingerprint", info.get("data_fingerprint") if isinstance(info, dict) else None)
    return saved


def check_resume_of_finished(folder: str | Path, config: dict, fingerprint: str | None, result: str) -> bool:
    """``--resume`` over a folder whose run finished: True if it is this very run (same config
    and data: nothing left to do); CheckpointError naming what differs if it is another (its
    ``result``, config.yaml and log.json stay as they are); False if no run finished there.
    ``fingerprint`` None: compare the config only (the data is not read yet)."""
    saved = finished_run_config(folder)
    if saved is None:
        return False
    keys = list(compared_config(config))
    old = {"data_fingerprint": saved["data_fingerprint"] if fingerprint is not None else None,
           "config": {k: saved.get(k) for k in keys}}
    new = {"data_fingerprint": fingerprint, "config": {k: config[k] for k in keys}}
    problem = identity_mismatch(old, new)
    if problem:
        raise CheckpointError(f"{folder}: --resume: the run that finished there is another run ({problem}); "
                              f"its {result}, config.yaml and log.json are kept: run without --resume to replace "
                              "them, or use another folder")
    return True


def save_run_config(out_dir: str | Path, config: dict, info: dict) -> None:
    """The resolved config (args.yaml, like timm) and run info, beside every output."""
    import yaml
    out_dir = Path(out_dir)
    from .io import atomic_write_text
    atomic_write_text(yaml.safe_dump(config, sort_keys=False), out_dir / "config.yaml")
    atomic_write_text(json.dumps(info, indent=2) + "\n", out_dir / "run_info.json")
