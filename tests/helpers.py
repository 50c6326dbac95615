"""The tests' shared helpers, each written once:

  * ``build_course``: THE builder of a synthetic course folder (numbered JPEGs + ``labels.csv``
    with the header ``name;label``, ``;``-separated rows); the recipes of the pixels
    (``synthetic_image``, ``colour_image``, ...) are small functions handed to it;
  * ``server_grey``: the server's grey formula (sRGB -> linear -> Rec.709 luminance -> sRGB) in
    numpy float64, the oracle the toolkit is checked against (deliberately not imported from
    toolkit);
  * ``assert_one_line_error``: an error is exactly one line ``error: <culprit>: ...``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# (width, height) of the synthetic images, cycled over the files of a folder.
DEFAULT_SIZES = [(100, 75), (75, 100), (45, 100), (120, 130), (100, 100), (99, 37), (101, 100),
                 (16, 100)]
DEFAULT_CLASSES = ("apple", "book", "cat")


# ----------------------------------------------------------------------------------------
# Synthetic course folder
# ----------------------------------------------------------------------------------------
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


def write_labels(folder: Path, rows: Sequence[tuple[str, str]], header: str | None = "name;label") -> None:
    """labels.csv: ``header`` (none if None) then one ``name;label`` row per image."""
    text = ("" if header is None else header + "\n") + "".join(f"{name};{label}\n" for name, label in rows)
    (Path(folder) / "labels.csv").write_text(text, encoding="utf-8")


def build_course(folder: Path, labels: Sequence[str], image: Callable[[int, str], Image.Image] | None = None, *,
                 sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES, grey_every: int = 4, name: str = "{:07d}.jpg",
                 first: int = 1, quality: int = 90, exist_ok: bool = False) -> Path:
    """A synthetic course folder: image i (label ``labels[i]``) is ``image(i, labels[i])`` saved as
    JPEG ``name.format(first + i)`` at ``quality``; labels.csv lists them in order.

    Without ``image``: ``synthetic_image`` of size ``sizes[i % len(sizes)]``, seed i,
    single-channel 'L' when i % grey_every == grey_every - 1 (never if grey_every is 0), else RGB.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=exist_ok)
    if image is None:
        def image(i, _label):
            mode = "L" if grey_every and i % grey_every == grey_every - 1 else "RGB"
            return synthetic_image(*sizes[i % len(sizes)], mode, seed=i)
    rows = []
    for i, label in enumerate(labels):
        fname = name.format(first + i)
        image(i, label).save(folder / fname, quality=quality)
        rows.append((fname, label))
    write_labels(folder, rows)
    return folder


# Pixel recipes for build_course's ``image``: each returns image(i, label) -> PIL image, drawing
# from one generator in file order (so a folder is the same for the same arguments).
def colour_and_square(colours: dict[str, tuple[int, int, int]], size: tuple[int, int] = (60, 48), seed: int = 0):
    """RGB ``size`` (w, h): the class colour plus noise (sigma 12) and a bright 12 px square at a
    random place: classes separable by colour, images all different."""
    rng = np.random.default_rng(seed)

    def image(_i, label):
        w, h = size
        img = np.empty((h, w, 3), np.float64)
        img[:] = colours[label]
        img += rng.normal(0, 12, img.shape)
        y, x = rng.integers(0, h - 12), rng.integers(0, w - 12)
        img[y:y + 12, x:x + 12] = 250
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return image


def noisy_colour(colours: dict[str, tuple[int, int, int]], per_class: int, seed: int = 0):
    """RGB: the class colour plus noise (sigma 40); within each class of ``per_class`` images,
    100x75 and 75x100 alternate."""
    rng = np.random.default_rng(seed)

    def image(i, label):
        w, h = (100, 75) if i % per_class % 2 == 0 else (75, 100)
        return Image.fromarray(np.clip(np.array(colours[label]) + rng.normal(0, 40, (h, w, 3)), 0, 255)
                               .astype(np.uint8))
    return image


def brightness_by_class(classes: Sequence[str], sizes: Sequence[tuple[int, int]], seed: int = 0,
                        grey_every: int = 4):
    """Uniform noise over a class-dependent brightness (40 + 50 x index in ``classes``, 40 for a
    label not in it), size sizes[i % len(sizes)], converted to 'L' when i % grey_every ==
    grey_every - 1."""
    rng = np.random.default_rng(seed)

    def image(i, label):
        w, h = sizes[i % len(sizes)]
        base = 40 + 50 * (classes.index(label) if label in classes else 0)
        img = Image.fromarray(np.clip(base + rng.integers(0, 80, (h, w, 3)), 0, 255).astype(np.uint8))
        return img.convert("L") if grey_every and i % grey_every == grey_every - 1 else img
    return image


def cycled(classes: Sequence[str], n: int) -> list[str]:
    """n labels cycling over classes: classes[i % len(classes)]."""
    return [classes[i % len(classes)] for i in range(n)]


def per_class(counts: dict[str, int]) -> list[str]:
    """Labels class by class: counts[c] images of class c, in the order of counts."""
    return [cls for cls, count in counts.items() for _ in range(count)]


# ----------------------------------------------------------------------------------------
# The server's grey formula: the oracle
# ----------------------------------------------------------------------------------------
def server_grey(rgb: np.ndarray, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    """The server's grey formula in numpy float64, unrounded: sRGB in [0, 1] with R, G, B along
    ``axis`` -> linear -> 0.2126 R + 0.7152 G + 0.0722 B -> sRGB in [0, 1] (``axis`` dropped, or
    kept with size 1 if ``keepdims``)."""
    c = np.asarray(rgb, dtype=np.float64)
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    r, g, b = (np.take(lin, k, axis=axis) for k in range(3))
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    s = np.where(y <= 0.0031308, 12.92 * y, 1.055 * y ** (1 / 2.4) - 0.055)
    return np.expand_dims(s, axis) if keepdims else s


def server_grey_uint8(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint8: server_grey x 255, rounded half to even."""
    return np.round(server_grey(np.asarray(rgb, dtype=np.float64) / 255) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------
# One-line errors
# ----------------------------------------------------------------------------------------
def assert_one_line_error(message, *named, culprit: str | None = None, prefix: str = "error: ",
                          rc: int | None = None, code: int | None = None) -> str:
    """Assert ``message`` (stripped stderr text, a SystemExit code or an exception) is exactly one
    line (no newline at all) that starts with ``prefix`` (``error: ``; "" for an exception
    whose message gets the prefix later), continues with ``<culprit>:`` if a culprit is given,
    and names every one of ``named``; and, if ``code`` is given, that the exit code ``rc`` is
    ``code``. Returns the line."""
    if isinstance(message, BaseException):
        message = message.code if isinstance(message, SystemExit) else message
    text = str(message)
    if code is not None:
        assert rc == code, (rc, code, text)
    assert text, "no error message"
    assert "\n" not in text, f"more than one line:\n{text}"
    assert "Traceback" not in text, text
    assert text.startswith(prefix), f"does not start with {prefix!r}: {text}"
    if culprit is not None:
        assert text.startswith(f"{prefix}{culprit}:"), f"culprit {culprit!r} not first: {text}"
    for word in named:
        assert str(word) in text, f"{word!r} not named in: {text}"
    return text
