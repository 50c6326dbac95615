"""The paired comparison of nested held-out runs: distilled student vs its hard-label control.

    python scripts/heldout_pairs.py docs/heldout_pairs.csv                        # print it
    python scripts/heldout_pairs.py docs/heldout_pairs.csv --add D.provenance.json C.provenance.json

Each row (fold, seed, distilled, hard_label; accuracies in percent on the held-out fold) is one
distilled student and its --hard-labels control on the same fold of the same split with the same
seed (checked from their provenance files: a control scored on another split is refused).
--add puts such a pair in the CSV (replacing the row of the same fold and seed; the file is
written whole, then renamed). Prints the table per fold and over all pairs: mean gap with its
standard error, pairs with a positive gap, mean accuracy of each arm.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from toolkit.cli import run_main  # noqa: E402
from toolkit.estimates import format_pairs, read_pair, read_pairs_csv, write_pairs_csv  # noqa: E402


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", help="the pairs file (fold,seed,distilled,hard_label)")
    parser.add_argument("--add", nargs=2, action="append", default=[], metavar=("DISTILLED", "CONTROL"),
                        help="provenance files of a distilled student and its --hard-labels control (repeatable)")
    args = parser.parse_args(argv)
    new = [read_pair(distilled, control) for distilled, control in args.add]  # all checked before writing
    rows = read_pairs_csv(args.csv) if not new or os.path.exists(args.csv) else []
    if new:
        added = {(r["fold"], r["seed"]) for r in new}
        rows = sorted([r for r in rows if (r["fold"], r["seed"]) not in added] + new,
                      key=lambda r: (r["fold"], r["seed"]))
        write_pairs_csv(rows, args.csv)
    for fold in sorted({r["fold"] for r in rows}):
        print(format_pairs([r for r in rows if r["fold"] == fold], f"held-out fold {fold}") + "\n")
    print(format_pairs(rows, "all pairs"))
    return rows


if __name__ == "__main__":
    run_main(main)
