"""Shared fixtures: small synthetic course folders, an isolated data cache, the real data.

Synthetic folders (tests/helpers.py build_course) mimic the course layout: numbered JPEGs of
varied sizes (landscape, portrait, narrow, larger than 100 px), RGB and single-channel 'L', a few
classes, and ``labels.csv`` with the header ``name;label`` and ``;``-separated rows.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import DEFAULT_CLASSES, DEFAULT_SIZES, build_course, cycled

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "training_data"


@pytest.fixture
def make_course(tmp_path):
    """Factory: make_course(n=12, classes=..., sizes=..., name=..., grey_every=4) -> folder Path
    (tests/helpers.py build_course under tmp_path / name).

    Image i is numbered ``{i+1:07d}.jpg``, has size sizes[i % len(sizes)], is 'L' when
    i % grey_every == grey_every - 1 (else RGB) and belongs to classes[i % len(classes)].
    """
    def make(n: int = 12, classes=DEFAULT_CLASSES, sizes=DEFAULT_SIZES, name: str = "course",
             grey_every: int = 4) -> Path:
        return build_course(tmp_path / name, cycled(classes, n), sizes=sizes, grey_every=grey_every)
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
