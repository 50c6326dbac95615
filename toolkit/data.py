"""Course folders: reading, the server's preprocessing, the uint8 cache (splits: toolkit.splits).

A course folder holds numbered JPEGs and ``labels.csv`` (header ``name;label``, one
``file;classname`` row per image). Class ids are the sorted class names.

Two views of each image are kept, both 100x100 with the server's geometry (centre crop,
or edge pad with the extra pixel after):
  * ``grey``: (N, 1, 100, 100) uint8, bit-exact with the grading server
    (sRGB -> linear -> Rec.709 luminance -> sRGB, x255, rounded);
  * ``rgb``:  (N, 3, 100, 100) uint8, the same geometry in colour, for teachers.

EXIF orientation is deliberately ignored: the server reads raw pixel order and so must we.
"""
from __future__ import annotations

import csv
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .io import atomic_save

SIZE = 100  # the server's square input side
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CACHE_VERSION = 1  # bump when preprocessing changes: old caches are then rebuilt


class DataError(ValueError):
    """Bad input in a course folder; the message names the culprit on one line."""


# ----------------------------------------------------------------------------------------
# The server's grey conversion
# ----------------------------------------------------------------------------------------
def _srgb_to_linear(c):
    xp = torch if torch.is_tensor(c) else np
    return xp.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c):
    xp = torch if torch.is_tensor(c) else np
    positive = xp.clip(c, 1e-12, None)  # no NaN gradient of pow at 0 (a branch not taken there)
    return xp.where(c <= 0.0031308, 12.92 * c, 1.055 * positive ** (1 / 2.4) - 0.055)


def _luminance(lin, axis: int):
    """Rec. 709 luminance of linear RGB along ``axis`` (kept, as size 1, for tensors)."""
    r, g, b = (lin.narrow(axis, i, 1) if torch.is_tensor(lin) else lin.take(i, axis=axis) for i in range(3))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


# sRGB -> linear only ever sees 256 values: a float64 look-up table computed by the same
# formula gives bit-identical results, and is much faster than evaluating pow per pixel.
_LINEAR_LUT = _srgb_to_linear(np.arange(256, dtype=np.float64) / 255.0)


def rgb_to_server_grey(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 sRGB -> (H, W) uint8 grey, exactly as the grading server computes it."""
    return np.round(_linear_to_srgb(_luminance(_LINEAR_LUT[rgb], -1)) * 255).astype(np.uint8)


def server_grey(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float sRGB in [0, 1] -> (B, 1, H, W) float, the server's formula unrounded
    (a grey teacher's input). architecture.py keeps its own copy: it may import torch only."""
    return _linear_to_srgb(_luminance(_srgb_to_linear(rgb), 1))


def fit_to_square(img: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Centre crop or edge pad each spatial axis of (H, W[, C]) to ``size``.

    Cropping starts at (n - size) // 2; padding puts (size - n) // 2 pixels before and the
    rest (the extra pixel for odd differences) after, like the server's np.pad(mode="edge").
    """
    for axis in (0, 1):
        n = img.shape[axis]
        if n > size:
            start = (n - size) // 2
            img = img.take(range(start, start + size), axis=axis)
        elif n < size:
            before = (size - n) // 2
            widths = [(0, 0)] * img.ndim
            widths[axis] = (before, size - n - before)
            img = np.pad(img, widths, mode="edge")
    return img


def image_to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any PIL image -> (H, W, 3) uint8 sRGB, grey modes replicated to three channels."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(np.round(arr / scale * 255), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode in ("L", "1", "LA", "F"):
        grey = np.asarray(img.convert("L"), dtype=np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Path -> (grey (100, 100) uint8, rgb (100, 100, 3) uint8) with the server's geometry."""
    grey, rgb, _ = _decode_image(path)
    return grey, rgb


# What the server reads exactly like we do: 8-bit RGB and grey. Any other mode (palette,
# RGBA, LA, CMYK, 16-bit, 1-bit) is converted sensibly for training and predict, and said so;
# the grader path (toolkit.grader) reads it as the server does instead.
EXACT_MODES = ("RGB", "L")


def _decode_image(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file is missing")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: image file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            rgb = image_to_rgb_array(img)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError,
            ValueError) as err:
        raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise DataError(f"{path}: image has no pixels")
    return fit_to_square(rgb_to_server_grey(rgb)), fit_to_square(rgb), mode


# ----------------------------------------------------------------------------------------
# labels.csv
# ----------------------------------------------------------------------------------------
def read_labels(folder: Path) -> list[tuple[str, str]]:
    """Read ``folder/labels.csv`` -> [(file name, class name)], validated against the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder does not exist")
    labels_path = folder / "labels.csv"
    if not labels_path.is_file():
        raise DataError(f"{labels_path}: labels.csv is missing")
    lines = _labels_lines(labels_path)
    if not lines or not lines[0].strip():
        raise DataError(f"{labels_path}: file is empty (expected header 'name;label')")
    header = lines[0].strip()
    if header != "name;label":
        hint = ""
        if ";" not in header and any(d in header for d in ",\t|"):
            hint = " (wrong delimiter: fields must be ';'-separated)"
        raise DataError(f"{labels_path}: header is {header!r}, expected 'name;label'{hint}")
    rows: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for lineno, row in enumerate(csv.reader(lines[1:], delimiter=";"), start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{labels_path}:{lineno}: malformed row {';'.join(row)!r}, "
                            "expected 'file;classname'")
        name, label = row[0].strip(), row[1].strip()
        if name in seen:
            raise DataError(f"{labels_path}:{lineno}: duplicate name {name!r} "
                            f"(first on line {seen[name]})")
        seen[name] = lineno
        if not (folder / name).is_file():
            raise DataError(f"{labels_path}:{lineno}: row names missing file {name!r}")
        rows.append((name, label))
    if not rows:
        raise DataError(f"{labels_path}: no rows (the folder has no labelled images)")
    unlabelled = sorted(set(list_images(folder)) - seen.keys())
    if unlabelled:
        more = f" and {len(unlabelled) - 1} more" if len(unlabelled) > 1 else ""
        raise DataError(f"{folder / unlabelled[0]}: image has no row in labels.csv{more}")
    return rows


def _labels_lines(labels_path: Path) -> list[str]:
    try:
        with open(labels_path, newline="", encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{labels_path}: not UTF-8 text (bad byte at offset {err.start})") from None


def _line_of_name(labels_path: Path, name: str) -> int:
    """1-based line of the first row naming ``name`` (blank lines counted, as editors do)."""
    for lineno, row in enumerate(csv.reader(_labels_lines(labels_path), delimiter=";"), start=1):
        if lineno > 1 and row and row[0].strip() == name:
            return lineno
    return 0


def list_images(folder: Path) -> list[str]:
    """Sorted file names of the images directly inside ``folder``."""
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def folder_fingerprint(folder: Path, names: list[str]) -> str:
    """Hash of labels.csv plus every image's name and bytes: changes when the data does, and
    only then (a copy of the folder, or the same files with new mtimes, keep their caches and
    the trunk features keyed by it)."""
    folder = Path(folder)
    h = hashlib.blake2b(f"v{CACHE_VERSION}".encode(), digest_size=16)
    h.update((folder / "labels.csv").read_bytes() if (folder / "labels.csv").is_file() else b"")
    for name in names:
        h.update(f"{name}|".encode())
        try:
            h.update((folder / name).read_bytes())
        except FileNotFoundError:
            raise DataError(f"{folder / name}: image file is missing") from None
        except OSError as err:
            raise DataError(f"{folder / name}: cannot be read ({err.strerror or type(err).__name__})") from None
    return h.hexdigest()[:16]


def course_fingerprint(folder: str | Path) -> str:
    """The fingerprint ``load_course_folder`` gives ``folder``, without decoding an image."""
    folder = Path(folder).resolve()
    return folder_fingerprint(folder, [name for name, _ in read_labels(folder)])


# ----------------------------------------------------------------------------------------
# The decoded data set
# ----------------------------------------------------------------------------------------
@dataclass
class CourseData:
    """A decoded course folder: everything in memory as uint8 tensors."""
    names: list[str]
    grey: torch.Tensor            # (N, 1, 100, 100) uint8, the server's view
    rgb: torch.Tensor             # (N, 3, 100, 100) uint8, the teachers' view
    labels: torch.Tensor          # (N,) int64 class ids, -1 where unlabelled
    classes: list[str]            # id -> class name, sorted
    fingerprint: str
    folder: str = ""

    def __len__(self) -> int:
        return len(self.names)


def decode_paths(paths: list[Path], progress: bool = True, desc: str = "decode"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode image files -> (grey (N,1,100,100), rgb (N,3,100,100)) uint8."""
    grey = torch.empty((len(paths), 1, SIZE, SIZE), dtype=torch.uint8)
    rgb = torch.empty((len(paths), 3, SIZE, SIZE), dtype=torch.uint8)
    converted = []
    for i, path in enumerate(tqdm(paths, desc=desc, unit="img", disable=not progress, leave=False)):
        g, c, mode = _decode_image(path)
        grey[i, 0] = torch.from_numpy(g)
        rgb[i] = torch.from_numpy(np.ascontiguousarray(c.transpose(2, 0, 1)))
        if mode not in EXACT_MODES:
            converted.append(f"{Path(path).name} ({mode})")
    if converted:
        more = f" and {len(converted) - 1} more" if len(converted) > 1 else ""
        warnings.warn(f"{Path(paths[0]).parent}: {converted[0]}{more} converted to 8-bit RGB / grey; the grading "
                      "server reads such images differently (python -m toolkit.evaluate grader reads them its way)",
                      stacklevel=2)
    return grey, rgb


def decode_folder(folder: Path, names: list[str], progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``names`` in ``folder`` -> (grey (N,1,100,100), rgb (N,3,100,100)) uint8."""
    return decode_paths([Path(folder) / n for n in names], progress, desc=f"decode {Path(folder).name}")


def default_cache_dir() -> Path:
    return Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache" / "distill-toolkit"))


def load_course_folder(folder: str | Path, classes: list[str] | None = None,
                       cache_dir: str | Path | None = None, progress: bool = True) -> CourseData:
    """Read, validate and decode a labelled course folder, through an on-disk uint8 cache.

    ``classes`` fixes the id mapping (e.g. a teacher's); labels outside it are an error.
    The cache is keyed by the folder's fingerprint, so any change of names, image bytes or
    labels.csv rebuilds it; a corrupt cache file is rebuilt with a warning, never used.
    """
    folder = Path(folder).resolve()
    rows = read_labels(folder)
    names = [n for n, _ in rows]
    found = sorted({lab for _, lab in rows})
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        name = next(n for n, lab in rows if lab == unknown[0])
        line = _line_of_name(folder / "labels.csv", name)
        raise DataError(f"{folder / 'labels.csv'}:{line}: unknown class {unknown[0]!r} for {name!r} "
                        f"(known: {', '.join(classes)})")
    class_id = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([class_id[lab] for _, lab in rows], dtype=torch.int64)
    fingerprint = folder_fingerprint(folder, names)

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_path = cache_dir / f"{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}.pt"
    cached = _read_cache(cache_path, fingerprint)
    if cached is None:
        grey, rgb = decode_folder(folder, names, progress=progress)
        try:
            atomic_save({"version": CACHE_VERSION, "fingerprint": fingerprint, "names": names,
                         "grey": grey, "rgb": rgb}, cache_path)
        except OSError as err:  # an unwritable cache only costs time
            warnings.warn(f"{cache_path}: could not write data cache ({err})")
    else:
        grey, rgb = cached["grey"], cached["rgb"]
    return CourseData(names=names, grey=grey, rgb=rgb, labels=labels, classes=list(classes),
                      fingerprint=fingerprint, folder=str(folder))


def _read_cache(path: Path, fingerprint: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        ok = (blob.get("version") == CACHE_VERSION and blob.get("fingerprint") == fingerprint
              and blob["grey"].shape[0] == blob["rgb"].shape[0] == len(blob["names"]))
    except Exception as err:  # truncated / corrupt file: rebuild, never trust it
        warnings.warn(f"{path}: data cache is corrupt ({type(err).__name__}); rebuilding")
        return None
    return blob if ok else None


def load_image_files(paths: list[str | Path], progress: bool = True) -> CourseData:
    """Decode unlabelled image files (any size, RGB or grey) with the server's preprocessing."""
    paths = [Path(p) for p in paths]
    grey, rgb = decode_paths(paths, progress)
    return CourseData(names=[p.name for p in paths], grey=grey, rgb=rgb,
                      labels=torch.full((len(paths),), -1, dtype=torch.int64), classes=[],
                      fingerprint="", folder="")
