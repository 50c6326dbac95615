"""Teachers and their ensemble on held-out images, fed the RGB image or the student's grey one.

    python scripts/target_input.py --folds 3 --val-fold 0 teachers/lite0_224px_f0 teachers/lite2_224px_f0

Prints, for each input (rgb: the photo; grey: the server's grey image replicated to 3
channels, what the student sees), each teacher's and the probability-mean ensemble's accuracy,
NLL and mean entropy on the val fold of the seed-0 k-fold split. Every teacher must hold that
fold out (checked). The logits are the cached labels of distill.py --view-kind mixed (the plain
view), so a later distillation reuses them.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from toolkit.cli import run_main  # noqa: E402
from toolkit.mixviews import identity_views, teacher_mixed_logits  # noqa: E402
from toolkit.splits import load_held_out  # noqa: E402


def describe(log_p, y):
    p = log_p.exp()
    return (f"acc {(log_p.argmax(1) == y).float().mean():.4f}  nll {F.nll_loss(log_p, y):.3f}  "
            f"entropy {-(p * log_p).sum(1).mean():.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("teachers", nargs="+")
    parser.add_argument("--data", default="../shared/data/training_data")
    parser.add_argument("--folds", type=int, default=3, help="k of the seed-0 k-fold split [>= 2]")
    parser.add_argument("--val-fold", type=int, default=0, help="the held-out fold [0, folds)")
    parser.add_argument("--inputs", nargs="+", default=["rgb", "grey"], choices=["rgb", "grey"])
    args = parser.parse_args(argv)
    teachers, data, val = load_held_out(args.teachers, args.data, args.folds, args.val_fold, "--val-fold")
    y = data.labels[val]

    plain = identity_views(len(data), 1)
    for kind in args.inputs:
        images = data.rgb if kind == "rgb" else data.grey
        log_ps = []
        for folder, t in teachers.items():
            logits = teacher_mixed_logits(t, images, plain, val, kind, data.fingerprint)[:, 0]
            log_ps.append(logits.float().log_softmax(1))
            print(f"{kind:<5} {os.path.basename(folder.rstrip('/')):<22} {describe(log_ps[-1], y)}", flush=True)
        ensemble = torch.logsumexp(torch.stack(log_ps), 0) - torch.log(torch.tensor(float(len(log_ps))))
        print(f"{kind:<5} {'ensemble':<22} {describe(ensemble, y)}  ({len(val)} images)", flush=True)


if __name__ == "__main__":
    run_main(main, resume_hint="run it again (the labels computed so far are cached)")
