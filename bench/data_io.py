"""Decode time of a course folder vs loading its uint8 cache.

    python bench/data_io.py [--data DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from toolkit.data import load_course_folder  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="../shared/data/training_data")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        data = load_course_folder(args.data, cache_dir=cache, progress=False)
        decode = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_course_folder(args.data, cache_dir=cache, progress=False)
        cached = time.perf_counter() - t0
    print(f"{len(data)} images: decode + write cache {decode:.1f} s, load from cache {cached:.2f} s "
          f"({decode / cached:.0f}x)")


if __name__ == "__main__":
    main()
