"""The grader reads images exactly as the course's code: np.array(Image.open(path)), then its
to_grayscale (a 2-D array passes unchanged, an (H, W, 3) one gets the sRGB luminance, any
other shape is a ValueError). Training and predict convert odd modes sensibly and say so.

The reference below computes the course's to_grayscale from its description on the tests' own
grey oracle (tests/helpers.py server_grey), apart from toolkit.grader's transcription and
toolkit.data's fast path, so that the three are compared, not assumed equal."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import server_grey, synthetic_image, write_labels
from toolkit.data import DataError, decode_image, fit_to_square, load_course_folder, rgb_to_server_grey
from toolkit.grader import course_to_grayscale, load_server_batch, read_server_image


def reference_to_grayscale(pil_image: np.ndarray) -> np.ndarray:
    """The course's to_grayscale as its description reads, on the tests' own oracle of the
    server's grey formula (tests/helpers.py server_grey, written apart from the product code): a
    2-D array passes unchanged; an (H, W, 3) one gets sRGB -> linear -> Rec.709 luminance -> sRGB,
    x255, rounded for integer dtypes, in its own dtype; any other shape is refused.
    -> (1, H, W), as the course returns."""
    if pil_image.ndim == 2:
        return pil_image.copy()[None]
    if pil_image.ndim != 3:
        raise ValueError("image must have either shape (H, W) or (H, W, 3)")
    if pil_image.shape[2] != 3:
        raise ValueError(f"image has shape (H, W, {pil_image.shape[2]}), but it should have (H, W, 3)")
    grey = server_grey(pil_image.astype(np.float64) / 255) * 255
    integer = np.issubdtype(pil_image.dtype, np.integer)
    return (np.round(grey) if integer else grey).astype(pil_image.dtype)[None]


def server_view(path) -> np.ndarray:
    """(100, 100) float32 in the server's units: reference to_grayscale, crop / edge pad, / 255."""
    grey = reference_to_grayscale(np.array(Image.open(path)))[0]
    return fit_to_square(grey).astype(np.float32) / 255


def odd_images(folder):
    rgb = synthetic_image(90, 70, "RGB", seed=1)
    images = {
        "p.png": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32),
        "i16.png": Image.fromarray(np.full((80, 60), 32768, dtype=np.uint16)),
        "bits.png": rgb.convert("1"),
        "rgb.jpg": rgb, "grey.jpg": synthetic_image(120, 40, "L", seed=2), "rgb.png": rgb,
    }
    for name, img in images.items():
        img.save(folder / name)
    return images


def test_course_to_grayscale_matches_reference_and_training_on_8bit_rgb():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    assert np.array_equal(course_to_grayscale(arr), reference_to_grayscale(arr)[0])
    every = np.stack([*np.meshgrid(np.arange(256), np.arange(256), indexing="ij"), np.zeros((256, 256), int)], -1)
    for channel_order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):  # every pair of values in every pair of channels
        a = every[..., channel_order].astype(np.uint8)
        want = reference_to_grayscale(a)[0]
        assert np.array_equal(course_to_grayscale(a), want)
        assert np.array_equal(rgb_to_server_grey(a), want)  # the training path agrees on 8-bit RGB


def test_grader_reads_odd_modes_exactly_as_the_course(tmp_path):
    odd_images(tmp_path)
    for name in ("p.png", "i16.png", "bits.png", "rgb.jpg", "grey.jpg", "rgb.png"):
        got = read_server_image(tmp_path / name)
        assert got.dtype == np.float32 and got.shape == (100, 100), name
        assert np.array_equal(got, server_view(tmp_path / name)), name
    # palette: raw indices (0..31), not the colours' luminance
    raw = np.array(Image.open(tmp_path / "p.png"))
    assert np.array_equal(read_server_image(tmp_path / "p.png"), fit_to_square(raw).astype(np.float32) / 255)
    assert read_server_image(tmp_path / "p.png").max() <= 31 / 255
    # 16-bit keeps its values (32768 / 255), 1-bit stays 0 / 1
    assert read_server_image(tmp_path / "i16.png").max() == np.float32(32768) / 255
    assert set(np.unique(read_server_image(tmp_path / "bits.png"))) <= {0.0, np.float32(1) / 255}


@pytest.mark.parametrize("mode,channels", [("RGBA", 4), ("LA", 2), ("CMYK", 4)])
def test_grader_refuses_what_the_course_refuses(tmp_path, mode, channels):
    path = tmp_path / ("img.jpg" if mode == "CMYK" else "img.png")
    synthetic_image(50, 40, "RGB").convert(mode).save(path)
    with pytest.raises(ValueError, match=rf"\(H, W, {channels}\)"):
        reference_to_grayscale(np.array(Image.open(path)))
    with pytest.raises(ValueError, match=rf"\(H, W, {channels}\)"):
        course_to_grayscale(np.array(Image.open(path)))
    with pytest.raises(DataError, match=rf"^{path}: the server's to_grayscale refuses it .*\(H, W, {channels}\)"):
        read_server_image(path)


def test_grader_batch_equals_training_grey_for_8bit_rgb_and_grey_jpegs(make_course, cache_dir):
    folder = make_course(n=12)  # RGB and L JPEGs of varied sizes
    data = load_course_folder(folder, progress=False)
    x, labels = load_server_batch(folder, data.classes)
    assert x.dtype == torch.float32 and tuple(x.shape) == (12, 1, 100, 100)
    assert torch.equal(x, data.grey.float() / 255) and torch.equal(labels, data.labels)


def test_training_converts_odd_modes_and_says_so(tmp_path, cache_dir):
    odd_images(tmp_path)
    write_labels(tmp_path, [(n, "a" if i % 2 else "b") for i, n in enumerate(sorted(
        ["p.png", "i16.png", "bits.png", "rgb.jpg", "grey.jpg", "rgb.png"]))])
    with pytest.warns(UserWarning, match=r"bits.png \(1\) and 2 more converted to 8-bit RGB / grey"):
        data = load_course_folder(tmp_path, progress=False)
    grey16, _ = decode_image(tmp_path / "i16.png")  # converted sensibly: mid-grey stays mid-grey
    assert abs(int(grey16.mean()) - 128) <= 1
    assert len(data) == 6
