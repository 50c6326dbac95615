"""Frozen trunks: compute a backbone's first stages once on fixed views, train the rest.

``TrunkSplit`` splits a timm backbone (or the student, whose names are timm's) into a frozen
trunk (stem + the first n stages, BatchNorm in eval mode) and the trainable rest. The trunk's
features of K fixed views of every image are computed once, stored in fp16 in the cache folder
(``trunk_cache_path``) and shared by every fold's teacher and by the soft-target pass.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from .augment import apply_views
from .backbones import TeacherError
from .data import default_cache_dir
from .io import atomic_save

log = logging.getLogger(__name__)


class TrunkSplit(nn.Module):
    """Splits a timm backbone into a frozen ``trunk`` (stem + the first n stages) and the
    trainable rest, so that trunk features of fixed views can be computed once and reused:
    the result is exactly the full model's output on those views (the trunk, BatchNorm
    included, is frozen in eval mode)."""

    def __init__(self, backbone: nn.Module, frozen_stages: int):
        super().__init__()
        self.backbone, self.frozen_stages = backbone, frozen_stages
        if hasattr(backbone, "conv_stem") and hasattr(backbone, "blocks"):  # EfficientNet family
            self.kind = "efficientnet"
            n_stages = len(backbone.blocks)
        elif all(hasattr(backbone, f"layer{i}") for i in range(1, 5)):     # ResNet family
            self.kind = "resnet"
            n_stages = 4
        else:
            raise TeacherError(f"{type(backbone).__name__}: frozen-trunk caching supports timm "
                               "EfficientNet/MobileNet- and ResNet-style models; use --frozen-stages 0")
        if not 0 < frozen_stages < n_stages:
            raise TeacherError(f"--frozen-stages must be in 1..{n_stages - 1} for this model")
        for p in self.trunk_parameters():
            p.requires_grad_(False)
        self.train(backbone.training)  # the trunk is in eval mode from the start, not after .train()
        self.takes_features = False  # True: forward() receives cached trunk features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Through forward() (not .head directly) so that DDP's gradient hooks fire.
        return self.head(x if self.takes_features else self.trunk(x))

    def trunk_modules(self) -> list[nn.Module]:
        b = self.backbone
        if self.kind == "efficientnet":
            return [b.conv_stem, b.bn1, *b.blocks[:self.frozen_stages]]
        return [b.conv1, b.bn1, b.act1, b.maxpool] + [getattr(b, f"layer{i}") for i in range(1, self.frozen_stages + 1)]

    def trunk_parameters(self):
        for m in self.trunk_modules():
            yield from m.parameters()

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.trunk_modules():
            m.eval()  # frozen BatchNorm statistics: features stay those that were cached
        return self

    @torch.no_grad()
    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.trunk_modules():
            x = m(x)
        return x

    def trunk_module(self) -> nn.Module:
        """The frozen trunk as one module (the same computation as ``trunk``), e.g. to export."""
        return nn.Sequential(*self.trunk_modules()).eval()

    def head_module(self) -> nn.Module:
        """``head`` as one module (trunk features -> logits), e.g. to export."""
        return _Head(self).eval()

    def head(self, f: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        f = f.contiguous(memory_format=torch.channels_last)  # cached features come contiguous
        if self.kind == "efficientnet":
            f = b.blocks[self.frozen_stages:](f)
            if hasattr(b, "bn2"):  # EfficientNet: conv_head + bn2 belong to forward_features
                f = b.bn2(b.conv_head(f))
            return b.forward_head(f)
        for i in range(self.frozen_stages + 1, 5):
            f = getattr(b, f"layer{i}")(f)
        return b.forward_head(f)


class _Head(nn.Module):
    def __init__(self, split: TrunkSplit):
        super().__init__()
        self.split = split

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.split.head(f)


# ----------------------------------------------------------------------------------------
# Trunk features of K views, and their on-disk cache
# ----------------------------------------------------------------------------------------
def trunk_cache_path(key: str, prefix: str = "trunk") -> Path:
    """The cache file of the trunk features named by ``key`` (in $TOOLKIT_CACHE): the one
    place that names these files, for teachers ('trunk') and the student ('student-trunk')."""
    return default_cache_dir() / f"{prefix}-{key}.pt"


def teacher_trunk_key(config: dict, fingerprint: str) -> str:
    """Key of a teacher's trunk features: every setting they depend on, and the data."""
    fields = tuple(config[k] for k in ("model", "pretrained", "input_mode", "input_size", "frozen_stages",
                                       "views", "max_shift", "seed")) + (fingerprint,)
    return hashlib.sha1(repr(fields).encode()).hexdigest()[:16]


def _shift_views(images_u8: torch.Tensor, image_idx: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return apply_views(images_u8[image_idx], params.long())


@torch.no_grad()
def compute_trunk_features(teacher, split: TrunkSplit, images_u8: torch.Tensor,
                           view_params: torch.Tensor, batch_size: int = 128,
                           device: str | torch.device = "cpu", desc: str = "trunk features",
                           rows: torch.Tensor | None = None, render=_shift_views) -> torch.Tensor:
    """Frozen-trunk features of K views of every image (or of the images ``rows``).

    ``teacher.prepare`` turns a uint8 view into the backbone's input; images_u8: (N, c, 100, 100)
    uint8; view_params: (N, K, P), by default P = 3 int [flip, dx, dy]; ``render(images_u8,
    image_idx, params)`` makes the uint8 views (mixviews.render_views for mixed views)
    -> (len(rows), K, C', h, w) float16 (halves memory; the trunk is frozen so these never change).
    """
    from .fastpass import frozen_runner
    rows = torch.arange(view_params.shape[0]) if rows is None else rows.long()
    k = view_params.shape[1]
    split.eval()
    out, trunk = None, None
    flat = torch.stack(torch.meshgrid(torch.arange(len(rows)), torch.arange(k), indexing="ij"), -1).view(-1, 2)
    for start in tqdm(range(0, len(flat), batch_size), desc=desc, unit="batch", leave=False):
        pos, j = flat[start:start + batch_size, 0], flat[start:start + batch_size, 1]
        views = render(images_u8, rows[pos], view_params[rows[pos], j])
        x = teacher.prepare(views.to(device))
        if trunk is None:  # ONNX Runtime when it can, checked against torch on this first batch
            trunk = frozen_runner(split.trunk_module(), x[:4], desc, device)
        feats = trunk(x).half().cpu()
        if out is None:
            out = torch.empty((len(rows), k, *feats.shape[1:]), dtype=torch.float16)
        out[pos, j] = feats
    return out


@functools.lru_cache(maxsize=1)
def load_trunk_file(path: Path, mtime_ns: int) -> dict:
    """Teachers of one recipe share one (large) trunk file: read it once per process."""
    return torch.load(path, map_location="cpu", weights_only=True)


def cached_trunk_features(path: Path, teacher, split: TrunkSplit, images_u8: torch.Tensor,
                          view_params: torch.Tensor, device: str | torch.device = "cpu",
                          save: bool = True, desc: str = "trunk features",
                          rows: torch.Tensor | None = None, render=_shift_views) -> torch.Tensor:
    """compute_trunk_features through an on-disk cache: ``path`` is used when it holds exactly
    these views (of exactly the images ``rows``, when given; its name must encode everything else
    the features depend on); otherwise the features are computed and, with ``save`` (the main
    rank), written atomically to ``path``."""
    stored_params = view_params if rows is None else view_params[rows.long()]
    if path.is_file():
        try:
            blob = load_trunk_file(path, path.stat().st_mtime_ns)
            if torch.equal(blob["view_params"], stored_params) and (
                    rows is None or torch.equal(blob["rows"], rows.long())):
                log.info(f"{desc}: reused {path.name} from the cache")
                return blob["features"]
        except Exception as err:
            log.warning(f"warning: {path}: corrupt trunk cache ({type(err).__name__}); recomputing")
    t0 = time.time()
    features = compute_trunk_features(teacher, split, images_u8, view_params, device=device, desc=desc,
                                      rows=rows, render=render)
    if save:
        log.info(f"{desc} {tuple(features.shape)} in {time.time() - t0:.0f}s")
        blob = {"features": features, "view_params": stored_params}
        if rows is not None:
            blob["rows"] = rows.long()
        try:
            atomic_save(blob, path)
        except OSError as err:  # a cache only saves time: a full disk or read-only cache folder is no failure
            log.warning(f"warning: {path}: trunk cache not written ({err.strerror or err}); "
                        "the features are used from memory and computed again by the next run")
    return features


def own_trunk_blob(teacher, fingerprint: str) -> dict | None:
    """{"features": (N, K, C', h, w), "view_params": (N, K, 3)}: the trunk cache the teacher was
    trained on, if it is on disk and made from this data; else None."""
    key = getattr(teacher, "config", {}).get("trunk_cache_key")
    if not key or teacher.config.get("data_fingerprint", fingerprint) != fingerprint:
        return None
    path = trunk_cache_path(key)
    if not path.is_file():
        return None
    try:
        return load_trunk_file(path, path.stat().st_mtime_ns)
    except Exception:
        return None


def stored_trunk_features(teacher, view_params: torch.Tensor, fingerprint: str) -> torch.Tensor | None:
    """The teacher's own frozen-trunk features for exactly these views, if on disk."""
    blob = own_trunk_blob(teacher, fingerprint)
    if blob is None or blob["view_params"].shape != view_params.shape \
            or not torch.equal(blob["view_params"], view_params):
        return None
    return blob["features"]


def trunk_identity(prepare, split: TrunkSplit, fingerprint: str, channels: int) -> "hashlib._Hash":
    """A hash of everything a frozen trunk's features depend on except the views: the data, the
    input transform ``prepare`` (seen on a fixed probe: size, grey/RGB, mean/std) and the frozen
    modules (structure, every weight and statistic). Fold teachers of one recipe share it."""
    h = hashlib.sha1(f"{fingerprint}|{split.trunk_modules()!r}".encode())
    probe = torch.arange(2 * channels * 100 * 100, dtype=torch.int64).remainder(251).to(torch.uint8)
    with torch.no_grad():
        h.update(prepare(probe.view(2, channels, 100, 100)).cpu().contiguous().numpy().tobytes())
    for m in split.trunk_modules():
        for t in m.state_dict().values():
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h


def view_trunk_features(identity: "hashlib._Hash", teacher, split: TrunkSplit, images_u8: torch.Tensor,
                        view_params: torch.Tensor, own: dict | None = None, device: str | torch.device = "cpu",
                        save: bool = True) -> torch.Tensor:
    """(N, K, C', h, w) fp16 trunk features of K views that need not be the ones the trunk's
    teachers were trained on (the student's views). A view in ``own`` (a teacher's trunk cache,
    ``own_trunk_blob``) is taken from it; every other view comes from a cache file of its own
    ('view-trunk-<key>', key: ``identity`` and the view), so each view of each backbone is
    computed once, whichever set of views a later run asks for."""
    columns = []
    for j in range(view_params.shape[1]):
        params = view_params[:, j:j + 1]
        if own is not None and own["view_params"].shape[0] == params.shape[0]:
            match = [i for i in range(own["view_params"].shape[1])
                     if torch.equal(own["view_params"][:, i:i + 1], params)]
            if match:
                columns.append(own["features"][:, match[0]])
                continue
        h = identity.copy()
        h.update(params.contiguous().numpy().tobytes())
        path = trunk_cache_path(h.hexdigest()[:16], prefix="view-trunk")
        columns.append(cached_trunk_features(path, teacher, split, images_u8, params, device, save=save,
                                             desc=f"trunk features, view {j + 1}/{view_params.shape[1]}")[:, 0])
    return torch.stack(columns, 1)


def rebuild_own_trunk_cache(teacher, rgb_u8: torch.Tensor, view_params: torch.Tensor, fingerprint: str,
                            device: str | torch.device = "cpu") -> bool:
    """Recompute a teacher's own trunk cache when it is missing (a fresh machine, a cleared
    cache), exactly as train_teacher.py made it: the same frozen trunk in fp32 (its start weights:
    teacher.pth keeps fp16), the same views, batches and order. Its soft targets are then the
    same bits as on the machine that trained it, whichever run computes them first. Only when at
    least one of ``view_params``' views is one of the teacher's own; True if the cache was written."""
    from .augment import sample_view_params
    from .teachers import build_teacher
    config = getattr(teacher, "config", {})
    key, frozen = config.get("trunk_cache_key"), config.get("frozen_stages", 0)
    if not key or not frozen or config.get("data_fingerprint") != fingerprint or trunk_cache_path(key).is_file():
        return False
    try:
        own_views = sample_view_params(len(rgb_u8), config["views"], config["max_shift"], config["seed"])
        if not any(torch.equal(own_views[:, i], view_params[:, j])
                   for i in range(own_views.shape[1]) for j in range(view_params.shape[1])):
            return False
        if config["pretrained"] == "none":  # a random start: only teacher.pth (fp16) has it
            return False
        start = build_teacher(teacher.model_name, teacher.classes, config["input_mode"], config["input_size"],
                              config["pretrained"])  # the frozen trunk as it was before training
    except Exception as err:  # e.g. hub weights with no network: the saved (fp16) trunk is used instead
        log.warning(f"warning: {getattr(teacher, 'folder', teacher.model_name)}: its trunk cache cannot be rebuilt "
                    f"({type(err).__name__}: {' '.join(str(err).split())[:160]}); using its saved fp16 trunk")
        return False
    split = TrunkSplit(start.backbone, frozen)
    saved = TrunkSplit(teacher.backbone, frozen)
    same = all(torch.equal(a.detach().half().float().cpu(), b.detach().float().cpu())
               for ma, mb in zip(split.trunk_modules(), saved.trunk_modules())
               for a, b in zip(ma.state_dict().values(), mb.state_dict().values()) if a.is_floating_point())
    if not same:  # the start weights changed since (another package version, another file)
        log.warning(f"warning: {getattr(teacher, 'folder', teacher.model_name)}: its start weights no longer match "
                    "its saved trunk; using the saved fp16 trunk")
        return False
    start.to(device)
    cached_trunk_features(trunk_cache_path(key), start, split, rgb_u8, own_views, device,
                          desc=f"trunk features of {Path(getattr(teacher, 'folder', '')).name} (rebuilt)")
    return True
