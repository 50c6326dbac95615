"""Training throughput of the pipeline vs the naive way, measured in the same run.

    python bench/throughput.py [--data DIR] [--teachers DIR ...] [--steps N]

Student: the pipeline's step (KD on stored ensemble probabilities of fixed views; with the
default recipe the student's frozen first stages were run once per view, so the step trains
the rest on their cached features) vs a naive PIL-per-sample DataLoader that runs the teacher
ensemble online every step and the whole student. Teacher: a step on cached frozen-trunk features vs a full
forward/backward of the backbone on PIL-loaded images.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill import DistillConfig  # noqa: E402
from toolkit.augment import apply_views, sample_view_params  # noqa: E402
from toolkit.data import fit_to_square, image_to_rgb_array, load_course_folder, rgb_to_server_grey  # noqa: E402
from toolkit.losses import kd_loss  # noqa: E402
from toolkit.student import StudentInput, exec_architecture  # noqa: E402
from toolkit.teachers import build_teacher, find_teacher_folders, load_teacher  # noqa: E402
from toolkit.trunk import TrunkSplit  # noqa: E402


class NaiveDataset(torch.utils.data.Dataset):
    """What one writes first: open, convert and flip one JPEG per __getitem__."""

    def __init__(self, folder, names, labels):
        self.folder, self.names, self.labels = Path(folder), names, labels

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        with Image.open(self.folder / self.names[i]) as img:
            rgb = image_to_rgb_array(img)
        grey, rgb = fit_to_square(rgb_to_server_grey(rgb)), fit_to_square(rgb)
        if np.random.rand() < 0.5:
            grey, rgb = grey[:, ::-1], rgb[:, ::-1]
        return (torch.from_numpy(grey.copy())[None].float() / 255,
                torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float() / 255, self.labels[i])


def timed(steps, fn, batch_size, warmup=1):
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return steps * batch_size / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/training_data")
    ap.add_argument("--teachers", nargs="*", default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    data = load_course_folder(args.data, progress=False)
    folders = args.teachers if args.teachers is not None else [str(p) for p in find_teacher_folders("teachers")]
    teachers = ([load_teacher(f) for f in folders]
                or [build_teacher("efficientnet_lite0", data.classes, "rgb", 160, "offline")])
    print(f"{len(teachers)} teacher(s): {[t.model_name for t in teachers]}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    bs = args.batch_size
    student = exec_architecture("architecture.py")["model"].train()
    recipe = DistillConfig()  # the default distillation recipe: views, frozen stages, KD settings
    frozen = recipe.student_frozen_stages
    opt = torch.optim.AdamW(student.parameters(), 1e-3)

    # --- student: pipeline (cached views, cached frozen-stage features, stored targets) ---
    k = recipe.views
    params = sample_view_params(len(data), k, recipe.max_shift, 0)
    # stands in for the stored ensemble probs
    targets = torch.softmax(torch.randn(len(data), k, len(data.classes)), -1).half()
    split = TrunkSplit(copy.deepcopy(student), frozen) if frozen else None
    pool = torch.randint(0, len(data), (4 * bs,))  # features of a few batches stand in for the on-disk cache
    with torch.no_grad():
        cached = (split.trunk(StudentInput(split.backbone).prepare(
                      apply_views(data.grey[pool], params[pool, 0].long()))).half()
                  if split else None)
    if split:
        split.takes_features = True
    s_opt = torch.optim.AdamW([p for p in (split or student).parameters() if p.requires_grad], 1e-3)

    def pipeline_student_step():
        j = torch.randint(0, len(pool), (bs,))
        idx, v = pool[j], torch.randint(0, k, (bs,))
        if split is not None:   # the default recipe: frozen stages' features were computed once
            logits = split.train()(cached[j].float())
        else:
            logits = student(apply_views(data.grey[idx], params[idx, v].long()).float() / 255)
        loss = kd_loss(logits, targets[idx, v].float(), data.labels[idx],
                       T=recipe.temperature, alpha=recipe.alpha)["loss"]
        s_opt.zero_grad()
        loss.backward()
        s_opt.step()

    # --- student: naive (PIL DataLoader + online ensemble) ------------------------------
    loader = torch.utils.data.DataLoader(NaiveDataset(data.folder, data.names, data.labels),
                                         batch_size=bs, shuffle=True, num_workers=0)
    batches = iter(loader)

    def naive_student_step():
        grey, rgb, y = next(batches)
        with torch.no_grad():
            probs = torch.stack([t(rgb).softmax(-1) for t in teachers]).mean(0)
        loss = kd_loss(student(grey), probs, y, T=recipe.temperature, alpha=recipe.alpha)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    fast = timed(args.steps * 4, pipeline_student_step, bs)
    slow = timed(args.steps, naive_student_step, bs)
    print(f"student  pipeline {fast:8.1f} img/s   naive {slow:8.1f} img/s   ratio {fast / slow:5.1f}x")

    # --- teacher: cached frozen trunk vs full fine-tune on PIL images -------------------
    teacher = build_teacher("efficientnet_lite0", data.classes, "rgb", 160, "offline")
    split = TrunkSplit(teacher.backbone, 5)
    with torch.no_grad():
        feats = split.trunk(teacher.prepare(data.rgb[:bs])).half()
    split.takes_features = True
    t_opt = torch.optim.AdamW([p for p in split.parameters() if p.requires_grad], 1e-3)

    def pipeline_teacher_step():
        loss = F.cross_entropy(split.train()(feats.float()), data.labels[:bs])
        t_opt.zero_grad()
        loss.backward()
        t_opt.step()

    full = build_teacher("efficientnet_lite0", data.classes, "rgb", 160, "offline").train()
    f_opt = torch.optim.AdamW(full.parameters(), 1e-3)
    batches = iter(loader)

    def naive_teacher_step():
        _, rgb, y = next(batches)
        loss = F.cross_entropy(full(rgb), y)
        f_opt.zero_grad()
        loss.backward()
        f_opt.step()

    fast = timed(args.steps * 2, pipeline_teacher_step, bs)
    slow = timed(max(2, args.steps // 2), naive_teacher_step, bs)
    print(f"teacher  pipeline {fast:8.1f} img/s   naive {slow:8.1f} img/s   ratio {fast / slow:5.1f}x"
          "   (pipeline excludes the one-off frozen-trunk pass: about 17 min for 8 views of 9,985 images)")


if __name__ == "__main__":
    main()
