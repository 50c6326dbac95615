"""Every heavy pass of the default recipe, today's torch path beside the fast one, in one run.

    python bench/passes.py [--images 256] [--threads 2] [--out docs/passes.csv]

Rows (random weights and random images: speed does not depend on them):
  * frozen passes (no training): teacher trunk features (Lite0 / Lite2 @ 224 px, stem + 5 stages),
    labelling (the whole teacher on a view), the student's frozen-stage features (stem + 2 stages
    at its input size), the report's student pass; eager torch channels_last (the code of
    2026-12-03) against ``toolkit.fastpass.frozen_runner`` (ONNX Runtime);
  * training steps (forward + backward + AdamW on cached features): a teacher head step, a
    student step; eager fp32 against ``torch.compile`` and, where the CPU has it, bf16 autocast;
  * the grading server's batch through ``architecture.py`` (torch only), by ``eval_chunk``.
Images/s are the best of 3 timed repeats after a warm-up; GFLOP/s count 2 FLOPs per multiply-add
(torch's FlopCounterMode, forward only for the frozen passes, forward x 3 for a training step)
and are given as a share of the same run's fp32 2048^3 matmul peak.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from toolkit.fastpass import ExportWrapper, frozen_runner  # noqa: E402
from toolkit.student import exec_architecture  # noqa: E402
from toolkit.trunk import TrunkSplit  # noqa: E402


def best_rate(fn, n_images: int, repeats: int = 3) -> float:
    fn()  # warm-up: oneDNN primitives, ONNX Runtime's first call, compilation
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_images / min(times)


def flops_per_image(fn, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter:
        fn(x[:1])
    return counter.get_total_flops()


def matmul_peak(dtype=torch.float32, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return best_rate(lambda: a @ b, 1) * 2 * n ** 3 / 1e9


def frozen_rows(images: int, peak: float):
    """(pass, path, img/s, GFLOP/s) of every frozen pass, eager channels_last vs fast."""
    torch.manual_seed(0)
    arch = exec_architecture("architecture.py")["model"].eval()
    size = arch.input_size or 100
    cases = []
    for name in ("efficientnet_lite0", "efficientnet_lite2"):
        net = timm.create_model(name, num_classes=20).eval().to(memory_format=torch.channels_last)
        x = torch.randn(images, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        split = TrunkSplit(net, 5).eval()
        cases.append((f"teacher trunk {name[13:]}@224", split.trunk_module(), x))
        cases.append((f"labelling {name[13:]}@224", net, x))
    grey = torch.randn(images, 1, size, size).contiguous(memory_format=torch.channels_last)
    cases.append((f"student features @{size}", TrunkSplit(arch, 2).eval().trunk_module(), grey))
    server = torch.rand(images, 1, 100, 100)
    cases.append(("report: student", ExportWrapper(arch), server))
    for label, module, x in cases:
        with torch.no_grad():
            flops = flops_per_image(module, x)
            fast = frozen_runner(module, x[:4], label)
            for path, fn in (("torch eager, channels_last, batch 128", module), ("fast (ONNX Runtime)", fast)):
                rate = best_rate(lambda: [fn(x[i:i + 128]) for i in range(0, len(x), 128)], len(x))
                yield label, path, rate, rate * flops / 1e9, peak


def training_rows(images: int, peak: float):
    """(step, path, img/s, GFLOP/s): a teacher head step and a student step on cached features."""
    torch.manual_seed(0)
    arch = exec_architecture("architecture.py")["model"].train()
    teacher = timm.create_model("efficientnet_lite0", num_classes=20).to(memory_format=torch.channels_last)
    t_split = TrunkSplit(teacher, 5).train()
    s_split = TrunkSplit(arch, 2).train()
    with torch.no_grad():
        t_feat = t_split.trunk(torch.randn(64, 3, 224, 224).contiguous(memory_format=torch.channels_last))
        s_feat = s_split.trunk(arch.normalise(torch.rand(128, 1, 100, 100)))
    bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for label, split, feat in (("teacher head step lite0@224, batch 64", t_split, t_feat),
                               ("student step, batch 128", s_split, s_feat)):
        y = torch.randint(0, 20, (len(feat),))
        flops = 3 * flops_per_image(split.head, feat)  # forward + backward (about 2x the forward)
        paths = [("torch eager fp32", split.head, None), ("torch.compile fp32", torch.compile(split.head), None)]
        if bf16:
            paths.append(("torch eager bf16 autocast", split.head, torch.bfloat16))
        opt = torch.optim.AdamW([p for p in split.parameters() if p.requires_grad], 1e-4)
        for path, fn, dtype in paths:
            def step():
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    loss = F.cross_entropy(fn(feat).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            steps = max(1, images // len(feat))
            rate = best_rate(lambda: [step() for _ in range(steps)], steps * len(feat))
            yield label, path, rate, rate * flops / 1e9, peak


def server_rows(images: int, peak: float):
    """The grading server's call, architecture.py as shipped and with other eval_chunk values."""
    ns = {}
    exec(open("architecture.py").read(), ns)
    model = ns["model"].eval()
    x = torch.rand(max(images, 512), 1, 100, 100)
    flops = flops_per_image(model, x)
    shipped = model.eval_chunk
    for chunk in sorted({shipped, 4, 8, 16, 32}):
        model.eval_chunk = chunk
        rate = best_rate(lambda: model(x), len(x))
        path = f"torch, eval_chunk {chunk}" + (" (shipped)" if chunk == shipped else "")
        yield "server batch", path, rate, rate * flops / 1e9, peak
    model.eval_chunk = shipped


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256, help="images per frozen pass (default 256)")
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads (default 2)")
    ap.add_argument("--out", default=None, help="also write the table as CSV")
    ap.add_argument("--only", choices=("frozen", "training", "server"), default=None)
    args = ap.parse_args()
    if args.images < 8 or args.threads < 1:
        ap.error("--images must be >= 8 and --threads >= 1")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOOLKIT_CACHE", str(Path("runs/bench-cache").resolve()))
    peak = matmul_peak()
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"{args.threads} threads, CPU capability {capability}, fp32 matmul peak {peak:.0f} GFLOP/s, "
          f"bf16 {matmul_peak(torch.bfloat16):.0f} GFLOP/s")
    groups = {"frozen": frozen_rows, "training": training_rows, "server": server_rows}
    rows = []
    print("| pass | path | img/s | GFLOP/s | share of fp32 peak |\n| --- | --- | --- | --- | --- |")
    for name, rows_of in groups.items():
        if args.only in (None, name):
            for label, path, rate, gflops, peak_ in rows_of(args.images, peak):
                rows.append((label, path, round(rate, 1), round(gflops, 1), round(gflops / peak_, 3)))
                print(f"| {label} | {path} | {rate:.1f} | {gflops:.1f} | {100 * gflops / peak_:.0f} % |", flush=True)
    if args.out:
        with open(args.out, "w", newline="") as f:
            csv.writer(f).writerows([("pass", "path", "images_per_s", "gflops", "share_of_fp32_peak"), *rows])


if __name__ == "__main__":
    main()
