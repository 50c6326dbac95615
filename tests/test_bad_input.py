"""Bad course folders fail with a toolkit.data.DataError whose one-line message names the
culprit file or row; odd but valid images (CMYK, RGBA, palette, 16-bit, tiny, huge) decode."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import assert_one_line_error, synthetic_image, write_labels
from toolkit.data import DataError, decode_image, load_course_folder


def load_error(folder, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        load_course_folder(folder, progress=False, **kwargs)
    msg = assert_one_line_error(err.value, prefix="")  # the prefix comes at exit
    assert msg.strip(), repr(msg)
    return msg


def set_labels_text(folder: Path, text: str) -> None:
    (folder / "labels.csv").write_text(text, encoding="utf-8")


def test_missing_folder(tmp_path, cache_dir):
    msg = load_error(tmp_path / "no_such_folder")
    assert "no_such_folder" in msg and "does not exist" in msg


def test_missing_labels_csv(make_course, cache_dir):
    folder = make_course(n=3)
    (folder / "labels.csv").unlink()
    msg = load_error(folder)
    assert str(folder / "labels.csv") in msg and "missing" in msg


def test_wrong_header(make_course, cache_dir):
    folder = make_course(n=3)
    text = (folder / "labels.csv").read_text().replace("name;label", "file;class", 1)
    set_labels_text(folder, text)
    msg = load_error(folder)
    assert "labels.csv" in msg and "'file;class'" in msg and "name;label" in msg


def test_wrong_delimiter(make_course, cache_dir):
    folder = make_course(n=3)
    set_labels_text(folder, (folder / "labels.csv").read_text().replace(";", ","))
    msg = load_error(folder)
    assert "labels.csv" in msg and "delimiter" in msg


@pytest.mark.parametrize("row", ["0000002.jpg", "0000002.jpg;book;extra", ";book", "0000002.jpg;"])
def test_malformed_row(make_course, cache_dir, row):
    folder = make_course(n=3)
    lines = (folder / "labels.csv").read_text().splitlines()
    lines[2] = row  # line 3 of the file
    set_labels_text(folder, "\n".join(lines) + "\n")
    msg = load_error(folder)
    assert "labels.csv:3" in msg and "malformed" in msg and repr(row) in msg


def test_row_names_missing_file(make_course, cache_dir):
    folder = make_course(n=3)
    with open(folder / "labels.csv", "a") as f:
        f.write("0009999.jpg;cat\n")
    msg = load_error(folder)
    assert "labels.csv:5" in msg and "0009999.jpg" in msg


def test_image_without_row(make_course, cache_dir):
    folder = make_course(n=3)
    synthetic_image(100, 75).save(folder / "0000077.jpg")
    msg = load_error(folder)
    assert "0000077.jpg" in msg and "no row" in msg


def test_duplicate_names(make_course, cache_dir):
    folder = make_course(n=3)
    with open(folder / "labels.csv", "a") as f:
        f.write("0000002.jpg;cat\n")
    msg = load_error(folder)
    assert "labels.csv:5" in msg and "duplicate" in msg and "0000002.jpg" in msg and "line 3" in msg


def test_unknown_class_with_given_classes(make_course, cache_dir):
    folder = make_course(n=6)  # classes apple, book, cat; first 'cat' row is line 4
    msg = load_error(folder, classes=["apple", "book", "dog"])
    assert "labels.csv:4" in msg and "'cat'" in msg and "unknown class" in msg
    assert "0000003.jpg" in msg


def test_unknown_class_line_counts_blank_lines(make_course, cache_dir):
    folder = make_course(n=6)
    lines = (folder / "labels.csv").read_text().splitlines()
    lines.insert(1, "")  # a blank line after the header: the first 'cat' row moves to line 5
    set_labels_text(folder, "\n".join(lines) + "\n")
    assert load_course_folder(folder, progress=False).classes == ["apple", "book", "cat"]
    msg = load_error(folder, classes=["apple", "book"])
    assert "labels.csv:5" in msg and "'cat'" in msg


def test_labels_csv_not_utf8(make_course, cache_dir):
    folder = make_course(n=3)
    (folder / "labels.csv").write_bytes(b"name;label\n0000001.jpg;caf\xe9\n0000002.jpg;book\n"
                                        b"0000003.jpg;cat\n")
    msg = load_error(folder)
    assert "labels.csv" in msg and "UTF-8" in msg


def _corrupt_random(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())


def _truncate(path: Path) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


def _zero(path: Path) -> None:
    path.write_bytes(b"")


def _text(path: Path) -> None:
    path.write_text("this is not a JPEG, just text\n" * 20)


@pytest.mark.parametrize("damage", [_corrupt_random, _truncate, _zero, _text],
                         ids=["random_bytes", "truncated", "zero_bytes", "text"])
def test_bad_image_names_the_file_and_writes_no_cache(make_course, cache_dir, damage):
    folder = make_course(n=6, sizes=[(400, 300)])  # big enough that half a JPEG is truncated
    culprit = folder / "0000004.jpg"
    damage(culprit)
    msg = load_error(folder)
    assert str(culprit) in msg
    assert list(cache_dir.iterdir()) == []  # neither a cache nor a temp file
    with pytest.raises(DataError) as err:
        decode_image(culprit)
    assert_one_line_error(err.value, "0000004.jpg", prefix="")


def test_decompression_bomb_is_a_data_error(make_course, cache_dir, monkeypatch):
    """Pillow's DecompressionBombError is not an OSError: it must still become a DataError."""
    folder = make_course(n=3, sizes=[(120, 100)])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 12,000 px > 2x the limit
    msg = load_error(folder)
    assert str(folder / "0000001.jpg") in msg
    assert list(cache_dir.iterdir()) == []


def test_empty_folder(tmp_path, cache_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = load_error(empty)
    assert "labels.csv" in msg and "empty" in msg


def test_header_only_labels(tmp_path, cache_dir):
    folder = tmp_path / "header_only"
    folder.mkdir()
    write_labels(folder, [])
    msg = load_error(folder)
    assert str(folder / "labels.csv") in msg and "no rows" in msg


def test_empty_labels_file(make_course, cache_dir):
    folder = make_course(n=2)
    set_labels_text(folder, "")
    msg = load_error(folder)
    assert "labels.csv" in msg and "empty" in msg


# ---- odd but valid images ------------------------------------------------------------------
def _odd_images(folder: Path) -> dict[str, Image.Image]:
    rng = np.random.default_rng(3)
    rgb = synthetic_image(90, 70, "RGB", seed=1)
    p = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (70, 90), dtype=np.uint8)))
    i16 = Image.fromarray(np.full((80, 60), 32768, dtype=np.uint16))
    return {
        "0000001.jpg": rgb.convert("CMYK"),
        "0000002.png": rgba,
        "0000003.png": p,
        "0000004.png": i16,
        "0000005.jpg": synthetic_image(20, 15, "RGB", seed=2),
        "0000006.jpg": synthetic_image(31, 31, "L", seed=3),
        "0000007.jpg": synthetic_image(1600, 1200, "RGB", seed=4),
        "0000008.jpg": synthetic_image(3000, 90, "RGB", seed=5),
    }


def test_odd_modes_and_sizes_decode(tmp_path, cache_dir):
    folder = tmp_path / "odd"
    folder.mkdir()
    images = _odd_images(folder)
    for name, img in images.items():
        img.save(folder / name)
    with Image.open(folder / "0000004.png") as check:
        assert check.mode.startswith("I")  # really a 16-bit grey PNG
    with Image.open(folder / "0000001.jpg") as check:
        assert check.mode == "CMYK"
    for name in images:
        grey, rgb = decode_image(folder / name)
        assert grey.shape == (100, 100) and grey.dtype == np.uint8, name
        assert rgb.shape == (100, 100, 3) and rgb.dtype == np.uint8, name
    # 16-bit mid-grey stays mid-grey (not clipped to white, not truncated to the low byte)
    grey16, rgb16 = decode_image(folder / "0000004.png")
    assert abs(int(grey16.min()) - 128) <= 1 and abs(int(grey16.max()) - 128) <= 1
    assert (rgb16[..., 0] == rgb16[..., 2]).all()
    # CMYK is converted to RGB, not read as 4 raw channels
    _, rgb_cmyk = decode_image(folder / "0000001.jpg")
    with Image.open(folder / "0000001.jpg") as im:
        want = np.asarray(im.convert("RGB"))
    assert np.array_equal(rgb_cmyk[15:85, 5:95], want)
    write_labels(folder, [(name, "x" if i % 2 else "y") for i, name in enumerate(images)])
    # converted for training, and said so (the grader reads them as the server does: test_grader_read.py)
    with pytest.warns(UserWarning, match=r"0000001.jpg \(CMYK\) and 3 more converted to 8-bit RGB / grey"):
        data = load_course_folder(folder, progress=False)
    assert tuple(data.grey.shape) == (8, 1, 100, 100) and tuple(data.rgb.shape) == (8, 3, 100, 100)
    assert len(list(cache_dir.glob("*.pt"))) == 1
