"""Teachers: a timm backbone with its own input conventions, saved as a self-describing folder.

A teacher folder holds ``teacher.pth``: weights plus everything that rebuilds the model
(timm name, classes, input mode/size/normalisation, the resolved config, metrics), so
``load_teacher(folder)`` needs nothing else.

Every teacher takes the *same* input as the rest of the toolkit, an RGB view (B, 3, 100, 100)
in [0, 1] with the server's geometry, and converts it to its own input (grey via the server
formula or RGB, resized, normalised): like timm's DistillationTeacher.normalize_input.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import TeacherError, create_backbone
from .data import server_grey
from .io import atomic_save

TEACHER_FILE = "teacher.pth"


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
        # channels_last: oneDNN's fast convolution layout on CPUs (README), and the usual GPU layout.
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


def teacher_runner(teacher: Teacher, example_rgb: torch.Tensor, device: str | torch.device = "cpu"):
    """A function equal to ``teacher`` in eval mode (RGB view -> logits): the input conversion in
    torch, the backbone through ``fastpass.frozen_runner`` (ONNX Runtime when it can), checked
    against torch on the first images of ``example_rgb``."""
    from .fastpass import frozen_runner
    teacher.eval()
    name = str(getattr(teacher, "folder", None) or teacher.model_name)
    backbone = frozen_runner(teacher.backbone, teacher.prepare(example_rgb[:4].to(device)), name, device)
    return lambda rgb: backbone(teacher.prepare(rgb))


@torch.no_grad()
def predict_logits(module: nn.Module, rgb_u8: torch.Tensor, batch_size: int = 256,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Run ``module`` (a teacher, or an ensemble: its members, then its combination) over
    (N, 3, 100, 100) uint8 -> (N, C) float32; teachers through ``teacher_runner``."""
    from tqdm import tqdm
    module.eval()
    if not len(rgb_u8):
        return torch.empty(0)
    is_ensemble = hasattr(module, "combine_logits")
    members = list(module.teachers) if is_ensemble else [module]
    logits = []
    for t in members:
        run = teacher_runner(t, rgb_u8, device) if isinstance(t, Teacher) else t
        logits.append(torch.cat([run(rgb_u8[i:i + batch_size].to(device)).float().cpu()
                                 for i in tqdm(range(0, len(rgb_u8), batch_size), desc="teacher predictions",
                                               unit="batch", leave=False)]))
    return module.combine_logits(torch.stack(logits)) if is_ensemble else logits[0]
