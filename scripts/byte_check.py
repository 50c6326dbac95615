"""Same seed, same bytes: hashes of every training outcome on a tiny synthetic world.

    python scripts/byte_check.py --out before.json              # at one commit
    python scripts/byte_check.py --out after.json --compare before.json   # at another

Builds the tests' tiny world (tests/helpers_distill.py: 36 small JPEGs, a narrow 3-class
MyCNN, timm's test_efficientnet teachers at 32 px) in a temporary folder, then runs
train_teacher.py (online with TrivialAugment + mixup, and on a cached frozen trunk) and
distill.py in every mode (cached, cached + mixup, online, online + mixup, scratch, DIST,
calibrated, student frozen stages, a frozen-trunk teacher), all single-threaded on the CPU.
It records sha256 of each run's weights (tensors in key order) and of its log.json's losses and
metrics per epoch, and with --compare lists what differs. Uses only the scripts' command
lines, so any two commits can be compared. About a minute on one core.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402


def tensors_sha(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        h.update(key.encode())
        if torch.is_tensor(value):
            h.update(str(value.dtype).encode() + str(tuple(value.shape)).encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def log_sha(folder: Path) -> str:
    rows = json.loads((folder / "log.json").read_text())
    # losses and metrics only (not wall-clock seconds, nor fields later versions added)
    rows = [{k: v for k, v in row.items() if k.startswith(("train_", "val_")) or k in ("epoch", "step")}
            for row in rows]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def run_all(root: Path) -> dict:
    import distill
    from helpers_distill import distill_argv, make_course_folder, train_tiny_teacher, write_arch
    results = {}
    os.environ["TOOLKIT_CACHE"] = str(root / "cache")
    data = make_course_folder(root / "data")
    arch = write_arch(root / "arch.py")

    def teacher(name, **kw):
        out = train_tiny_teacher(data, root / "teachers" / name, **kw)
        blob = torch.load(out / "teacher.pth", map_location="cpu", weights_only=False)
        results[f"teacher {name}"] = {"weights": tensors_sha(blob["state_dict"]), "log": log_sha(out)}
        return out

    folds = [teacher(f"fold{f}", fold=f, folds=3) for f in range(3)]
    trunk = teacher("trunk", fold=1, folds=3, frozen_stages=2)
    teacher("online_aug", fold=0, folds=3, extra=["--trivial-augment", "--mixup", "0.2"])

    runs = {
        "cached": dict(teachers=folds),
        "cached mixup": dict(teachers=folds, mixup=0.2),
        "online": dict(teachers=folds[:2], mode="online"),
        "online mixup": dict(teachers=folds[:2], mode="online", mixup=0.2),
        "online mixup T2": dict(teachers=folds[:2], mode="online", mixup=0.2, temperature=2.0),
        "cached mixup T2": dict(teachers=folds, mixup=0.2, temperature=2.0),
        "scratch": dict(hard_labels=True, teachers_root=root / "none"),
        "dist": dict(teachers=folds, loss="dist"),
        "calibrate": dict(teachers=folds, calibrate=True),
        "student frozen": dict(teachers=folds, student_frozen_stages=2),
        "scratch frozen": dict(hard_labels=True, teachers_root=root / "none", student_frozen_stages=2),
        "trunk teacher": dict(teachers=[trunk], max_shift=8, view_seed=0),
    }
    for name, flags in runs.items():
        out, work = root / "runs" / name.replace(" ", "_") / "model.pth", root / "runs" / name.replace(" ", "_")
        argv = distill_argv(data, arch, out, work, flags.pop("teachers", ()), **flags)
        distill.main(argv)
        results[f"distill {name}"] = {
            "weights": tensors_sha(torch.load(out, map_location="cpu", weights_only=True)),
            "file": hashlib.sha256(out.read_bytes()).hexdigest(), "log": log_sha(work)}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="where to write the hashes (JSON)")
    ap.add_argument("--compare", type=Path, help="hashes of another commit to compare with")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stderr(io.StringIO()):  # progress bars
            results = run_all(Path(tmp))
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    if args.compare:
        ref = json.loads(args.compare.read_text())
        same = [k for k in ref if results.get(k) == ref[k]]
        print(f"identical: {len(same)}/{len(ref)}")
        for k in ref:
            if results.get(k) != ref[k]:
                print(f"DIFFERS: {k}: " + ", ".join(f for f in ref[k] if results.get(k, {}).get(f) != ref[k][f]))
    else:
        print(f"{len(results)} runs hashed -> {args.out}")


if __name__ == "__main__":
    main()
