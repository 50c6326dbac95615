"""The default recipe's Lite0 trunk pass on the real data, the torch path and the fast path in one run.

    python bench/trunk_pass.py [--data ../shared/data/training_data] [--model efficientnet_lite0]

Exactly the work of a cold ``./run.sh``'s first trunk pass (the plain image and its mirror of every
image, 224 px, stem + 5 stages, batches of 128), once with ``TOOLKIT_FAST_PASSES=0`` (eager torch,
channels_last: the code of 2026-12-03) and once through ONNX Runtime. The torch path's seconds are
the yardstick the issues scale cold-run times by ("its Lite0 trunk pass about 395 s"); nothing is
written to the cache.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from toolkit.augment import sample_view_params  # noqa: E402
from toolkit.data import load_course_folder  # noqa: E402
from toolkit.teachers import build_teacher  # noqa: E402
from toolkit.trunk import TrunkSplit, compute_trunk_features  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/training_data")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--frozen-stages", type=int, default=5)
    args = ap.parse_args()
    data = load_course_folder(args.data, progress=False)
    teacher = build_teacher(args.model, data.classes, "rgb", args.size, "offline").eval()
    split = TrunkSplit(teacher.backbone, args.frozen_stages)
    views = sample_view_params(len(data), 2, 0, 0)  # the plain image and its mirror
    print(f"{args.model}@{args.size}, {len(data)} images x 2 views, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    results = {}
    for path, switch in (("torch (TOOLKIT_FAST_PASSES=0)", "0"), ("fast (ONNX Runtime)", "1")):
        os.environ["TOOLKIT_FAST_PASSES"] = switch
        t0 = time.perf_counter()
        features = compute_trunk_features(teacher, split, data.rgb, views, batch_size=128)
        results[path] = time.perf_counter() - t0
        print(f"{path}: {results[path]:.0f} s ({features.shape[0] * features.shape[1] / results[path]:.0f} img/s)",
              flush=True)
    slow, fast = results.values()
    print(f"ratio torch / fast: {slow / fast:.2f}")


if __name__ == "__main__":
    main()
