"""Wall time of each stage of the default pipeline, from raw JPEGs to model.pth and report,
in fresh folders (nothing reused: set TOOLKIT_CACHE to an empty folder to include the
decode and the frozen-trunk pass).

    TOOLKIT_CACHE=$(mktemp -d) python bench/pipeline_stages.py [--data DIR]    (about 1 h here)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pipeline  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/training_data")
    args, rest = ap.parse_known_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        pipeline.main(["--data", args.data, "--teachers-root", f"{tmp}/teachers", "--out", f"{tmp}/model.pth",
                       "--work-dir", f"{tmp}/work", "--report-dir", f"{tmp}/report", *rest])


if __name__ == "__main__":
    main()
