"""Shared fixtures: small synthetic course folders, an isolated data cache, the real data.

Synthetic folders mimic the course layout: numbered JPEGs of varied sizes (landscape,
portrait, narrow, larger than 100 px), RGB and single-channel 'L', a few classes, and
``labels.csv`` with the header ``name;label`` and ``;``-separated rows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "training_data"

# (width, height) of the synthetic images, cycled over the files of a folder.
DEFAULT_SIZES = [(100, 75), (75, 100), (45, 100), (120, 130), (100, 100), (99, 37), (101, 100),
                 (16, 100)]
DEFAULT_CLASSES = ("apple", "book", "cat")


def synthetic_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth gradient plus noise (so JPEG keeps structure), asymmetric in both axes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = 255 * (xx / max(width - 1, 1)) * 0.6 + 255 * (yy / max(height - 1, 1)) * 0.3
    if mode == "L":
        arr = base + rng.normal(0, 20, (height, width))
    else:
        arr = np.stack([base, base[::-1, ::-1], 255 - base], axis=2) + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode)


def write_labels(folder: Path, rows: list[tuple[str, str]], header: str = "name;label") -> None:
    text = header + "\n" + "".join(f"{name};{label}\n" for name, label in rows)
    (folder / "labels.csv").write_text(text, encoding="utf-8")


@pytest.fixture
def make_course(tmp_path):
    """Factory: make_course(n=12, classes=..., sizes=..., name=...) -> folder Path.

    Image i is numbered ``{i+1:07d}.jpg``, has size sizes[i % len(sizes)], is 'L' when
    i % 4 == 3 (else RGB) and belongs to classes[i % len(classes)].
    """
    def make(n: int = 12, classes=DEFAULT_CLASSES, sizes=DEFAULT_SIZES, name: str = "course",
             grey_every: int = 4) -> Path:
        folder = tmp_path / name
        folder.mkdir(parents=True)
        rows = []
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            mode = "L" if grey_every and i % grey_every == grey_every - 1 else "RGB"
            fname = f"{i + 1:07d}.jpg"
            synthetic_image(w, h, mode, seed=i).save(folder / fname, quality=90)
            rows.append((fname, classes[i % len(classes)]))
        write_labels(folder, rows)
        return folder
    return make


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh, empty data cache for this test (TOOLKIT_CACHE points at it)."""
    path = tmp_path / "toolkit-cache"
    path.mkdir()
    monkeypatch.setenv("TOOLKIT_CACHE", str(path))
    return path


@pytest.fixture
def shared_cache(world, monkeypatch):
    """The cache (data + trunk features) of the requesting module's ``world`` fixture instead of
    the per-test fresh one (test_distill, test_reliability, test_mixviews)."""
    monkeypatch.setenv("TOOLKIT_CACHE", str(world.cache))
    return world.cache


@pytest.fixture(autouse=True)
def _never_touch_home_cache(tmp_path_factory, monkeypatch):
    """No test may write to ~/.cache: default TOOLKIT_CACHE to a throw-away folder."""
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path_factory.mktemp("default-cache")))


@pytest.fixture
def shared_data() -> Path:
    """The real course folder beside the repository (../shared/data/training_data)."""
    if not (SHARED_DATA / "labels.csv").is_file():
        pytest.skip(f"{SHARED_DATA} not found: the shared course folder is absent")
    return SHARED_DATA
