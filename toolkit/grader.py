"""The grading server's own reading of images, for the grader mode: np.array(Image.open(path))
-> the course's ``to_grayscale`` (transcribed as it is, in the image's own dtype; training and
predict use toolkit.data's bit-identical, faster path for 8-bit RGB and grey) -> crop / pad."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .data import DataError, _line_of_name, fit_to_square, read_labels


def course_to_grayscale(pil_image: np.ndarray) -> np.ndarray:
    """The course's ``to_grayscale``, transcribed: a 2-D array passes unchanged (so a palette
    PNG stays raw palette indices, 16-bit and 1-bit arrays keep their values); an (H, W, 3)
    array gets sRGB -> linear -> Rec.709 luminance -> sRGB, x255 (rounded for integer dtypes)
    in its own dtype; any other shape (RGBA, LA, CMYK ...) is a ValueError."""
    if pil_image.ndim == 2:
        return pil_image.copy()
    if pil_image.ndim != 3:
        raise ValueError("image must have either shape (H, W) or (H, W, 3)")
    if pil_image.shape[2] != 3:
        raise ValueError(f"image has shape (H, W, {pil_image.shape[2]}), but it should have (H, W, 3)")
    rgb = pil_image / 255
    rgb_linear = np.where(rgb < 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    grey_linear = 0.2126 * rgb_linear[..., 0] + 0.7152 * rgb_linear[..., 1] + 0.0722 * rgb_linear[..., 2]
    grey = np.where(grey_linear < 0.0031308, grey_linear * 12.92, 1.055 * grey_linear ** (1 / 2.4) - 0.055)
    grey = grey * 255
    if np.issubdtype(pil_image.dtype, np.integer):
        grey = np.round(grey)
    return grey.astype(pil_image.dtype)


def read_server_image(path: str | Path) -> np.ndarray:
    """One image exactly as the server reads it: (100, 100) float32 = to_grayscale(np.array(
    Image.open(path))) with the server's crop / edge pad, / 255. DataError naming the file
    when the course's code would refuse it (e.g. RGBA: (H, W, 4))."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file is missing")
    try:
        with Image.open(path) as img:
            arr = np.array(img)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    try:
        grey = course_to_grayscale(arr)
    except ValueError as err:
        raise DataError(f"{path}: the server's to_grayscale refuses it (ValueError: {err})") from None
    return fit_to_square(grey).astype(np.float32) / 255


def load_server_batch(folder: str | Path, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A labelled folder as the grading server sees it: (N, 1, 100, 100) float32 and (N,) labels
    (ids in ``classes``); no cache and no conversion beyond the server's own."""
    folder = Path(folder).resolve()
    rows = read_labels(folder)
    class_id = {c: i for i, c in enumerate(classes)}
    for name, label in rows:
        if label not in class_id:
            line = _line_of_name(folder / "labels.csv", name)
            raise DataError(f"{folder / 'labels.csv'}:{line}: unknown class {label!r} for {name!r} "
                            f"(known: {', '.join(classes)})")
    x = torch.from_numpy(np.stack([read_server_image(folder / name) for name, _ in rows]))[:, None]
    return x, torch.tensor([class_id[label] for _, label in rows], dtype=torch.int64)
