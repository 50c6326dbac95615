"""Batch augmentation as tensor ops on whole uint8 batches (airbench style).

No per-image Python loops and no worker processes: a batch is augmented by a handful of
tensor operations in the training process.

Views. A "view" of an image is three integers (flip, dx, dy): an optional horizontal mirror,
then a translation with EDGE replication at the borders:

    view(img)[i, j] = mirrored(img)[clamp(i + dy, 0, H-1), clamp(j + dx, 0, W-1)]

which is exactly np.pad(img, s, mode="edge")[s+dy : s+dy+H, s+dx : s+dx+W] for any s >= |dx|,
|dy| (positive dx / dy move the content left / up). ``apply_views`` does this with one
advanced-indexing gather, so it is a pure re-indexing of pixels: it commutes with any
per-pixel colour map, in particular the server's RGB -> grey conversion, so a teacher's RGB
view and the student's grey view of the same image with the same params correspond exactly.

Randomness. Every random function takes an optional ``torch.Generator`` (None: the global
RNG). MixUp/CutMix and TrivialAugment come from torchvision.transforms.v2, which draw from
the global RNG; they are run under ``torch.random.fork_rng`` seeded from ``generator``, so
they are deterministic in it and leave the global RNG untouched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

__all__ = ["apply_views", "sample_view_params", "random_view_params", "batch_flip_lr",
           "batch_random_translate", "to_float", "mixup_cutmix", "trivial_augment"]


# ----------------------------------------------------------------------------------------
# Views: flip + edge-replicated translation
# ----------------------------------------------------------------------------------------
def apply_views(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply per-sample views to a batch: x (B, C, H, W) any dtype, params (B, 3) integer
    [flip, dx, dy] -> (B, C, H, W), same dtype and device.

    out[b, c, i, j] = x[b, c, clamp(i + dy, 0, H-1), col] with
    col = W-1 - clamp(j + dx, 0, W-1) if flip else clamp(j + dx, 0, W-1)
    (the column index is computed on the mirrored image). One gather, no loops.
    """
    if x.dim() != 4:
        raise ValueError(f"apply_views expects (B, C, H, W), got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    params = torch.as_tensor(params, device=x.device)
    if params.shape != (B, 3):
        raise ValueError(f"params must be ({B}, 3) [flip, dx, dy], got {tuple(params.shape)}")
    params = params.long()
    flip, dx, dy = params[:, 0:1] != 0, params[:, 1:2], params[:, 2:3]
    rows = (torch.arange(H, device=x.device) + dy).clamp_(0, H - 1)          # (B, H)
    cols = (torch.arange(W, device=x.device) + dx).clamp_(0, W - 1)          # (B, W)
    cols = torch.where(flip, (W - 1) - cols, cols)
    b = torch.arange(B, device=x.device).view(B, 1, 1, 1)
    c = torch.arange(C, device=x.device).view(1, C, 1, 1)
    return x[b, c, rows.view(B, 1, H, 1), cols.view(B, 1, 1, W)]


def random_view_params(n: int, max_shift: int = 0, flip: bool = True,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 3) int64 random [flip, dx, dy]: flip uniform in {0, 1} (0 if not ``flip``),
    dx and dy uniform integers in [-max_shift, max_shift]."""
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    f = torch.randint(0, 2, (n, 1), generator=generator) if flip else torch.zeros(n, 1, dtype=torch.long)
    d = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator)
    return torch.cat([f, d], dim=1)


def sample_view_params(n: int, k: int, max_shift: int, seed: int) -> torch.Tensor:
    """(n, k, 3) int8 view params for k views of each of n images, deterministic in seed.

    View 0 is the identity (0, 0, 0) and view 1 (when k >= 2) the pure mirror (1, 0, 0);
    views 2.. have a random flip in {0, 1} and dx, dy uniform in [-max_shift, max_shift].
    """
    if not 0 <= max_shift <= 127:
        raise ValueError(f"max_shift must be in [0, 127] to fit int8, got {max_shift}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    g = torch.Generator().manual_seed(seed)
    params = random_view_params(n * k, max_shift, generator=g).view(n, k, 3)
    params[:, 0] = 0
    if k >= 2:
        params[:, 1] = torch.tensor([1, 0, 0])
    return params.to(torch.int8)


def batch_flip_lr(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image of a (B, C, H, W) batch independently with probability 1/2."""
    return apply_views(x, random_view_params(x.shape[0], 0, flip=True, generator=generator))


def batch_random_translate(x: torch.Tensor, max_shift: int,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each image by its own random (dx, dy) in [-max_shift, max_shift]^2 with edge
    replication (no mirroring)."""
    return apply_views(x, random_view_params(x.shape[0], max_shift, flip=False, generator=generator))


def to_float(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) uint8 -> float32 in [0, 1]."""
    if x.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 input, got {x.dtype}")
    return x.to(torch.float32).div_(255.0)


# ----------------------------------------------------------------------------------------
# Library transforms, made deterministic in a generator
# ----------------------------------------------------------------------------------------
def _seed_from(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2**62, (), generator=generator))


def mixup_cutmix(x: torch.Tensor, labels_or_probs: torch.Tensor, num_classes: int,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp (Zhang et al. 2018) or CutMix (Yun et al. 2019) on a float batch.

    x: (B, C, H, W) float; labels_or_probs: (B,) int class ids in [0, num_classes) or (B,
    num_classes) probabilities. Returns (mixed x, soft targets (B, num_classes) float32).

    Implemented with torchvision.transforms.v2.MixUp / CutMix, which accept probability
    targets and mix them with the same lambda as the pixels (for CutMix, lambda is the
    actual box area). When both alphas are > 0 one of the two is chosen per batch with
    probability 1/2 (as timm's Mixup with switch_prob=0.5); an alpha of 0 disables that one;
    both 0 returns x unchanged with one-hot / given targets. torchvision pairs each sample
    with its neighbour in the batch (roll by 1), so the batch is first put in a random order
    and the result put back: each sample is mixed with a random partner, and output row i
    is still (a lambda-mix of) input row i.
    """
    if not x.is_floating_point():
        raise TypeError(f"mixup_cutmix expects a float batch (use to_float), got {x.dtype}")
    y = labels_or_probs
    if y.dim() == 1:
        if y.is_floating_point() or ((y < 0) | (y >= num_classes)).any():
            raise ValueError(f"int labels must be in [0, {num_classes}) (no unlabelled -1 rows)")
        y = F.one_hot(y.long(), num_classes)
    elif y.dim() != 2 or y.shape != (x.shape[0], num_classes):
        raise ValueError(f"targets must be ({x.shape[0]},) or ({x.shape[0]}, {num_classes}), "
                         f"got {tuple(labels_or_probs.shape)}")
    y = y.to(torch.float32)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"batch sizes differ: x {x.shape[0]}, targets {y.shape[0]}")
    choices = [v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []
    if cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not choices or x.shape[0] < 2:
        return x, y
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    inv = torch.argsort(perm)
    pick = int(torch.randint(len(choices), (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_from(generator))
        xm, ym = choices[pick](x[perm], y[perm.to(y.device)])
    return xm[inv], ym[inv.to(ym.device)]


def trivial_augment(x: torch.Tensor, generator: torch.Generator | None = None, chunks: int = 8,
                    num_magnitude_bins: int = 31,
                    interpolation: v2.InterpolationMode = v2.InterpolationMode.NEAREST,
                    fill: float | None = None) -> torch.Tensor:
    """TrivialAugment Wide (Mueller & Hutter 2021) on a (B, 1|3, H, W) uint8 batch.

    Uses torchvision.transforms.v2.TrivialAugmentWide, which applies ONE random op and
    magnitude to whatever batch it is given; for per-sample diversity the batch is split
    into ``chunks`` contiguous chunks (the batch is assumed to be in random order already)
    and each chunk gets its own op. Returns a uint8 batch of the same shape.
    """
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"trivial_augment expects (B, 1|3, H, W) uint8, got {x.dtype} "
                         f"{tuple(x.shape)}")
    if x.shape[0] == 0:
        return x.clone()
    ta = v2.TrivialAugmentWide(num_magnitude_bins=num_magnitude_bins,
                               interpolation=interpolation, fill=fill)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_from(generator))
        parts = [ta(part) for part in x.tensor_split(min(chunks, x.shape[0]))]
    return torch.cat(parts)
