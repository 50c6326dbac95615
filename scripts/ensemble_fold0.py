"""Fold-0 accuracy of single teachers and of equal-weight probability-mean ensembles of them.

    python scripts/ensemble_fold0.py --folds 3 teachers/lite0_224px_f0 teachers/lite2_224px_f0

Every teacher given must hold out fold 0 of the seed-0 k-fold split (checked; 5 folds unless said).
"""
import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from toolkit.data import load_course_folder  # noqa: E402
from toolkit.splits import check_teachers_held_out, fold_split  # noqa: E402
from toolkit.teachers import load_teacher  # noqa: E402
from toolkit.cli import run_main  # noqa: E402
from toolkit.config import ConfigError  # noqa: E402
from toolkit.ensemble import identity_view_logits  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("teachers", nargs="+")
    parser.add_argument("--data", default="../shared/data/training_data")
    parser.add_argument("--folds", type=int, default=5, help="k of the seed-0 k-fold split [>= 2]")
    args = parser.parse_args(argv)
    if args.folds < 2:
        raise ConfigError(f"--folds {args.folds}: a split needs at least 2 folds")

    teachers = {folder: load_teacher(folder) for folder in args.teachers}  # all checked before any work
    data = load_course_folder(args.data, progress=False)
    folds, _, val = fold_split(data.labels, args.folds, 0, 0)
    check_teachers_held_out(teachers, folds, data.labels, 0)
    y = data.labels[val]
    names, logp = [], []
    for folder, t in teachers.items():
        lp = identity_view_logits(t, data.rgb, data.fingerprint, images=val).log_softmax(-1)
        names.append(folder.rstrip('/').split('/')[-1])
        logp.append(lp)
        print(f"{names[-1]:<28} acc {(lp.argmax(1)==y).float().mean():.4f} nll {F.nll_loss(lp,y):.3f}", flush=True)
    logp = torch.stack(logp)
    for r in range(2, len(names) + 1):
        for combo in itertools.combinations(range(len(names)), r):
            mixed = torch.logsumexp(logp[list(combo)], 0) - torch.log(torch.tensor(float(r)))
            print(f"ens {'+'.join(names[i] for i in combo):<60} acc {(mixed.argmax(1)==y).float().mean():.4f} "
                  f"nll {F.nll_loss(mixed,y):.3f}")


if __name__ == "__main__":
    run_main(main, resume_hint="run it again (nothing is written)")
