"""Files the command-line tools are given besides course folders: images to classify
(files and folders) and sample-index files (e.g. a held-out fold)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .data import DataError, list_images


def expand_images(items: list[str]) -> list[Path]:
    """Files as given, folders -> their images (sorted); missing -> DataError."""
    paths = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = [p / name for name in list_images(p)]
            if not found:
                raise DataError(f"{p}: folder holds no .jpg/.jpeg/.png images")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise DataError(f"{p}: no such image file or folder")
    return paths


def load_indices(path: str | Path, n: int) -> torch.Tensor:
    """Sample indices (positions in labels.csv order) from .pt / .json: a list, a 1-D tensor,
    a boolean mask of length n, or a dict holding one under 'indices' / 'val_idx' / 'idx'."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: indices file not found")
    if path.suffix.lower() not in (".pt", ".pth", ".json"):
        raise DataError(f"{path}: indices file must be .pt/.pth or .json")
    try:
        obj = (json.loads(path.read_text()) if path.suffix.lower() == ".json"
               else torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:
        raise DataError(f"{path}: unreadable indices file ({type(err).__name__}: {err})") from None
    if isinstance(obj, dict):
        key = next((k for k in ("indices", "val_idx", "idx", "val_indices") if k in obj), None)
        if key is None:
            raise DataError(f"{path}: no 'indices' key (keys: {', '.join(map(str, obj))})")
        obj = obj[key]
    try:
        idx = torch.as_tensor(obj)
    except Exception:
        raise DataError(f"{path}: indices must be a list of integers") from None
    if idx.dtype == torch.bool:
        if idx.shape != (n,):
            raise DataError(f"{path}: boolean mask has shape {tuple(idx.shape)}, the folder has {n} images")
        idx = idx.nonzero().flatten()
    if idx.dim() != 1 or idx.is_floating_point() or idx.is_complex():
        raise DataError(f"{path}: indices must be a 1-D list of integers, got {idx.dtype} {tuple(idx.shape)}")
    if len(idx) == 0:
        raise DataError(f"{path}: no indices")
    if idx.min() < 0 or idx.max() >= n:
        bad = int(idx[(idx < 0) | (idx >= n)][0])
        raise DataError(f"{path}: index {bad} out of range for a folder of {n} images")
    if len(torch.unique(idx)) != len(idx):
        raise DataError(f"{path}: duplicate indices")
    return idx.long()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
