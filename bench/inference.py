"""Student CPU inference the server's way: per-image latency, and wall time + peak RSS of one
batch of 6,000 images (a fresh process, so the RSS is the model's alone).

    python bench/inference.py [--arch architecture.py] [--weights model.pth] [--n 6000]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

CHILD = r"""
import json, resource, sys, time, torch
ns = {}
exec(open(sys.argv[1]).read(), ns)
model = ns["model"]; model.load_state_dict(torch.load(sys.argv[2], map_location="cpu")); model.eval()
x = torch.rand(int(sys.argv[3]), 1, 100, 100)
t0 = time.perf_counter(); out = model(x); wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "out_shape": list(out.shape)}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="architecture.py")
    ap.add_argument("--weights", default="model.pth")
    ap.add_argument("--n", type=int, default=6000)
    args = ap.parse_args()
    ns = {}
    exec(open(args.arch).read(), ns)
    model = ns["model"]
    model.load_state_dict(torch.load(args.weights, map_location="cpu"))
    model.eval()
    x = torch.rand(1, 1, 100, 100)
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    times.sort()
    params = sum(p.numel() for p in model.parameters())
    print(f"params {params / 1e6:.2f}M, per-image latency (batch 1, median of 30): {times[15] * 1e3:.1f} ms")
    res = json.loads(subprocess.run([sys.executable, "-c", CHILD, args.arch, args.weights, str(args.n)],
                                    capture_output=True, text=True, check=True).stdout)
    print(f"one batch of {args.n}: {res['wall_s']:.1f} s wall, peak RSS {res['peak_rss_mb']:.0f} MB, "
          f"output {res['out_shape']}")


if __name__ == "__main__":
    main()
