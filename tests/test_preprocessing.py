"""The grading server's preprocessing, re-implemented here independently in plain numpy,
against toolkit.data.decode_image / load_course_folder: bit-exact grey, same geometry for
the rgb view, raw pixel order (no EXIF transpose)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import server_grey_uint8, synthetic_image, write_labels
from toolkit.data import decode_image, load_course_folder

SIDE = 100


# ---- the reference: a literal transcription of the server's formula ------------------
def server_rgb(path: Path) -> np.ndarray:
    """PIL open; 'L' replicated to R=G=B, anything else convert('RGB'). No EXIF transpose."""
    with Image.open(path) as img:
        if img.mode == "L":
            grey = np.asarray(img)
            return np.stack([grey, grey, grey], axis=2)
        return np.asarray(img.convert("RGB"))


def server_geometry(img: np.ndarray) -> np.ndarray:
    """Per spatial axis: centre crop from (n-100)//2, or edge pad (100-n)//2 before, rest after."""
    for axis in (0, 1):
        n = img.shape[axis]
        if n > SIDE:
            s = (n - SIDE) // 2
            img = img[s:s + SIDE] if axis == 0 else img[:, s:s + SIDE]
        elif n < SIDE:
            pad = [(0, 0)] * img.ndim
            pad[axis] = ((SIDE - n) // 2, SIDE - n - (SIDE - n) // 2)
            img = np.pad(img, pad, mode="edge")
    return img


def server_grey(path: Path) -> np.ndarray:
    return server_geometry(server_grey_uint8(server_rgb(path)))


def test_reference_geometry_is_what_we_think():
    """Guard the reference itself: 45 wide -> 27 cols before, 28 after; 101 -> drop last col."""
    a = np.arange(45, dtype=np.uint8)[None, :].repeat(100, 0)
    out = server_geometry(a)
    assert out.shape == (100, 100)
    assert (out[:, :27] == 0).all() and (out[:, 27:72] == a).all() and (out[:, 72:] == 44).all()
    b = np.arange(101, dtype=np.uint8)[None, :].repeat(130, 0)
    out = server_geometry(b)
    assert out.shape == (100, 100) and out[0, 0] == 0 and out[0, -1] == 99
    c = np.arange(130, dtype=np.uint8)[:, None].repeat(100, 1)
    assert server_geometry(c)[0, 0] == 15 and server_geometry(c)[-1, 0] == 114


# ---- (a) every real image ----------------------------------------------------------------
def test_decode_image_is_bit_exact_on_every_shared_image(shared_data):
    names = sorted(p.name for p in shared_data.glob("*.jpg"))
    assert len(names) == 9985
    t0 = time.perf_counter()
    mismatched = []
    for name in names:
        got = decode_image(shared_data / name)[0]
        want = server_grey(shared_data / name)
        assert got.shape == (100, 100) and got.dtype == np.uint8
        if not np.array_equal(got, want):
            mismatched.append(name)
    assert not mismatched, f"{len(mismatched)} images differ, e.g. {mismatched[:5]}"
    assert time.perf_counter() - t0 < 60


def test_load_course_folder_grey_is_bit_exact_on_shared_data(shared_data, tmp_path):
    cache = tmp_path / "cache"
    try:
        data = load_course_folder(shared_data, cache_dir=cache, progress=False)
        assert tuple(data.grey.shape) == (9985, 1, 100, 100) and tuple(data.rgb.shape) == (9985, 3, 100, 100)
        grey = data.grey.numpy()
        bad = [n for i, n in enumerate(data.names) if not np.array_equal(grey[i, 0], server_grey(shared_data / n))]
        assert not bad, f"{len(bad)} images differ, e.g. {bad[:5]}"
        # 20 classes, ids = sorted names
        assert data.classes == sorted(data.classes) and len(data.classes) == 20
        assert data.classes[0] == "book" and data.classes[-1] == "tree"
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # ~400 MB: don't leave it in /tmp


# ---- (b) synthetic edge cases --------------------------------------------------------------
EDGE_SIZES = [(100, 75), (75, 100), (45, 100), (100, 45), (120, 130), (130, 120), (250, 40),
              (99, 37), (101, 100), (100, 101), (16, 100), (100, 100), (1, 1), (3, 200)]


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("size", EDGE_SIZES, ids=[f"{w}x{h}" for w, h in EDGE_SIZES])
def test_decode_image_edge_cases(tmp_path, size, mode):
    path = tmp_path / "img.jpg"
    synthetic_image(*size, mode=mode, seed=sum(size)).save(path, quality=95)
    grey, rgb = decode_image(path)
    assert grey.shape == (100, 100) and grey.dtype == np.uint8
    assert rgb.shape == (100, 100, 3) and rgb.dtype == np.uint8
    assert np.array_equal(grey, server_grey(path))
    # The rgb view has exactly the same crop / pad geometry as the grey one.
    assert np.array_equal(rgb, server_geometry(server_rgb(path)))
    assert np.array_equal(server_grey_uint8(rgb), grey)
    if mode == "L":
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_geometry_puts_the_odd_pad_pixel_after(tmp_path):
    """A 99x37 image: rows padded 31 before / 32 after, one col padded after; lossless PNG."""
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (37, 99, 3), dtype=np.uint8)
    path = tmp_path / "odd.png"
    Image.fromarray(arr).save(path)
    grey, rgb = decode_image(path)
    assert np.array_equal(rgb[31:68, :99], arr)
    assert (rgb[:31] == rgb[31]).all() and (rgb[68:] == rgb[67]).all()
    assert (rgb[:, 99] == rgb[:, 98]).all()
    assert np.array_equal(grey, server_geometry(server_grey_uint8(arr)))


def test_geometry_crop_starts_at_floor_of_excess_half(tmp_path):
    """A 101x130 image: crop starts at column 0 and row 15."""
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (130, 101, 3), dtype=np.uint8)
    path = tmp_path / "big.png"
    Image.fromarray(arr).save(path)
    _, rgb = decode_image(path)
    assert np.array_equal(rgb, arr[15:115, 0:100])


def test_load_course_folder_matches_reference_on_synthetic_folder(make_course, cache_dir):
    folder = make_course(n=16)
    data = load_course_folder(folder, progress=False)
    for i, name in enumerate(data.names):
        assert np.array_equal(data.grey[i, 0].numpy(), server_grey(folder / name))
        assert np.array_equal(data.rgb[i].permute(1, 2, 0).numpy(),
                              server_geometry(server_rgb(folder / name)))


# ---- (c) EXIF orientation is ignored -------------------------------------------------------
def test_exif_rotation_is_not_applied(tmp_path, cache_dir):
    img = synthetic_image(100, 60, "RGB", seed=5)  # raw: 100 wide, 60 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a viewer would show it 60 wide, 100 high
    folder = tmp_path / "exif"
    folder.mkdir()
    img.save(folder / "0000001.jpg", quality=95, exif=exif.tobytes())
    path = folder / "0000001.jpg"
    with Image.open(path) as check:
        assert check.getexif().get(0x0112) == 6 and check.size == (100, 60)
    grey, rgb = decode_image(path)
    raw = server_rgb(path)
    assert raw.shape == (60, 100, 3)
    assert np.array_equal(rgb, server_geometry(raw))
    assert np.array_equal(grey, server_grey(path))
    # Raw 60 rows are edge-padded 20 above and below; a transposed decode would pad columns.
    assert (rgb[:20] == rgb[20]).all() and not (rgb[:, :20] == rgb[:, 20:21]).all()
    from PIL import ImageOps
    with Image.open(path) as im:
        rotated = server_geometry(np.asarray(ImageOps.exif_transpose(im).convert("RGB")))
    assert not np.array_equal(rgb, rotated)
    write_labels(folder, [("0000001.jpg", "cat")])
    data = load_course_folder(folder, progress=False)
    assert np.array_equal(data.grey[0, 0].numpy(), grey)
