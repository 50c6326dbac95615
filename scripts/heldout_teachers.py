"""Held-out accuracy and NLL of single teachers and of equal-weight probability-mean ensembles.

    python scripts/heldout_teachers.py --folds 3 --fold 0 teachers/lite0_224px_f0 teachers/lite2_224px_f0
    python scripts/heldout_teachers.py --fold 1 --csv docs/heldout_teachers.csv --label mixed4 T1 T2

Every teacher given must hold out fold ``--fold`` of the seed-0 k-fold split (checked: a
teacher that trained on one of its images is refused before anything is scored). Scored on the
plain images of that fold. ``--csv`` also writes the fold's rows ``fold,member,accuracy,nll``
(accuracy in percent; one row per teacher and one ``ensemble`` row of all of them; members named
``<label>/<folder name>``) into that file, replacing earlier rows of the same fold and members.
"""
import argparse
import csv
import io
import itertools
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from toolkit.cli import run_main  # noqa: E402
from toolkit.config import ConfigError  # noqa: E402
from toolkit.ensemble import identity_view_logits  # noqa: E402
from toolkit.io import atomic_write_text  # noqa: E402
from toolkit.splits import load_held_out  # noqa: E402

FIELDS = ("fold", "member", "accuracy", "nll")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("teachers", nargs="+")
    parser.add_argument("--data", default="../shared/data/training_data")
    parser.add_argument("--folds", type=int, default=3, help="k of the seed-0 k-fold split [>= 2]")
    parser.add_argument("--fold", type=int, default=0, help="the held-out fold scored [0, folds)")
    parser.add_argument("--csv", default="", help="also write this fold's rows into this CSV file")
    parser.add_argument("--label", default="", help="prefix of the members' names in the CSV")
    args = parser.parse_args(argv)
    teachers, data, val = load_held_out(args.teachers, args.data, args.folds, args.fold)
    y = data.labels[val]
    names, logp, rows = [], [], []

    def score(name, lp):
        acc, nll = float((lp.argmax(1) == y).float().mean()), float(F.nll_loss(lp, y))
        rows.append({"fold": args.fold, "member": f"{args.label}/{name}" if args.label else name,
                     "accuracy": round(100 * acc, 2), "nll": round(nll, 4)})
        print(f"{name:<60} acc {acc:.4f} nll {nll:.3f}", flush=True)

    for folder, t in teachers.items():
        names.append(Path(folder).name)
        logp.append(identity_view_logits(t, data.rgb, data.fingerprint, images=val).log_softmax(-1))
        score(names[-1], logp[-1])
    logp = torch.stack(logp)
    for r in range(2, len(names) + 1):
        for combo in itertools.combinations(range(len(names)), r):
            mixed = torch.logsumexp(logp[list(combo)], 0) - torch.log(torch.tensor(float(r)))
            name = "ensemble" if r == len(names) else "ens " + "+".join(names[i] for i in combo)
            score(name, mixed)
    if args.csv:
        write_rows(Path(args.csv), [r for r in rows if not r["member"].split("/")[-1].startswith("ens ")])


def write_rows(path: Path, rows: list[dict]) -> None:
    """Merge ``rows`` into the CSV at ``path`` (a row of the same fold and member is replaced)."""
    old = list(csv.DictReader(path.open())) if path.is_file() else []
    if old and set(old[0]) != set(FIELDS):
        raise ConfigError(f"--csv {path}: its columns are {sorted(old[0])}, not {list(FIELDS)}")
    new = {(str(r["fold"]), r["member"]) for r in rows}
    keep = [r for r in old if (r["fold"], r["member"]) not in new]
    out = io.StringIO()
    writer = csv.DictWriter(out, FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(keep + rows)
    atomic_write_text(out.getvalue(), path)


if __name__ == "__main__":
    run_main(main, resume_hint="run it again (nothing is written unless --csv)")
