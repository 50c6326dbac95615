"""One command to evaluate the student against each teacher and their ensemble.

    python -m toolkit.evaluate report  --data FOLDER [--arch architecture.py] [--weights model.pth]
                                       [--teachers DIR ...] --out reports/NAME
                                       [--indices-file held_out.pt|.json] [--heldout PROVENANCE ...]
    python -m toolkit.evaluate grader  --data FOLDER [--arch architecture.py] [--weights model.pth]
    python -m toolkit.evaluate predict --images FILE_OR_FOLDER [...] --out preds.csv
                                       [--student ARCH WEIGHTS | --teachers [DIR ...]]
                                       (default: the shipped student, architecture.py + model.pth)
    python -m toolkit.evaluate export  [--arch architecture.py] [--weights model.pth] --out DIR
                                       [--images FILE_OR_FOLDER ...]
    python -m toolkit.evaluate compare RUN [RUN ...] [--out table.csv|table.md]

(also installed as the console script ``toolkit-evaluate``). Every bad input ends the
command with one line ``error: <culprit>: <what is wrong>``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import logging
import sys
import time
from pathlib import Path

import torch

from .backbones import TeacherError
from .config import ConfigError, ConfigParser
from .data import DataError, load_course_folder, load_image_files
from .ensemble import load_ensemble, members_identity_logits
from .estimates import oof_ensemble_log_probs, read_heldout, student_seen, teacher_seen
from .export import PARITY_TOLERANCE, export_student
from .files import expand_images, load_indices, sha256_file
from .grader import load_server_batch
from .io import atomic_write_json, atomic_write_text, ensure_writable_dir, output_problem
from .metrics import model_cost
from .student import ContractError, check_output, load_student_checked, student_classes, student_log_probs
from .teachers import predict_logits

log = logging.getLogger(__name__)


def _stage(msg: str, t0: float) -> float:
    dt = time.perf_counter() - t0
    log.info(f"{msg} ({dt:.1f} s)")
    return dt


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------
def cmd_report(args) -> None:
    from .report import write_report
    timings = {}
    t_all = t0 = time.perf_counter()
    ensure_writable_dir(args.out)  # fail now, not after the predictions
    ensemble = load_ensemble(args.teachers)
    teachers = list(ensemble.teachers)
    classes, classes_source = student_classes(args.weights)
    if ensemble.classes != classes:
        raise TeacherError(f"{teachers[0].folder}: teacher classes {ensemble.classes} differ from the "
                           f"student's ({classes_source}): {classes}")
    model = load_student_checked(args.arch, args.weights)
    data = load_course_folder(args.data, classes=classes)
    idx = load_indices(args.indices_file, len(data)) if args.indices_file else torch.arange(len(data))
    grey, rgb, labels = data.grey[idx], data.rgb[idx], data.labels[idx]
    names = [data.names[i] for i in idx.tolist()]
    timings["load"] = _stage(f"data: {len(idx)} of {len(data)} images from {data.folder}, "
                             f"{len(teachers)} teacher(s), student", t0)

    t0 = time.perf_counter()
    s_lp = student_log_probs(model, grey, len(classes), args.batch_size, args.arch)
    timings["student"] = _stage("student predictions", t0)
    t0 = time.perf_counter()
    # identity-view logits of the whole folder (cheap when a teacher's trunk cache holds it)
    member = members_identity_logits(teachers, data.rgb, data.fingerprint, idx, args.batch_size)
    e_lp = ensemble.combine_logits(member)
    teacher_names = _unique_names([t.folder for t in teachers])
    t_seen = teacher_seen(teachers, data, idx)                                 # M x (n,) bool or None
    known = all(s is not None for s in t_seen)  # else no honest ensemble figure: any may have seen an image
    oof_lp, oof_covered = (oof_ensemble_log_probs(member, ensemble.weights, torch.stack(t_seen), ensemble.combine)
                           if known else (None, None))
    seen = {"student": student_seen(args.weights, data, idx),
            "ensemble": torch.stack(t_seen).any(0).numpy() if known else None,
            **{f"teacher:{n}": None if s is None else s.numpy() for n, s in zip(teacher_names, t_seen)}}
    heldout = [read_heldout(p) for p in args.heldout or []]
    timings["teachers"] = _stage(f"teacher predictions ({len(teachers)})", t0)

    t0 = time.perf_counter()
    sample = grey[:256].float() / 255
    runs = args.latency_runs
    efficiency = {"student": model_cost(model, sample, runs, max(1, runs // 10) if runs else 0,
                                        args.latency_threads)}
    for name, t in zip(teacher_names, teachers):
        efficiency[f"teacher:{name}"] = model_cost(t, rgb[:256], max(1, runs // 4) if runs else 0, 0,
                                                   args.latency_threads)
    efficiency["ensemble (sum of teachers)"] = {
        "parameters": sum(efficiency[f"teacher:{n}"]["parameters"] for n in teacher_names),
        "macs_per_image": sum(efficiency[f"teacher:{n}"]["macs_per_image"] for n in teacher_names)}
    timings["efficiency"] = _stage("parameters, MACs, latency", t0)

    meta = {"name": Path(args.out).name, "data": str(data.folder), "data_fingerprint": data.fingerprint,
            "indices_file": str(args.indices_file) if args.indices_file else None,
            "arch": str(args.arch), "weights": str(args.weights),
            "weights_sha256": sha256_file(Path(args.weights)), "classes_source": classes_source,
            "teachers": [t.folder for t in teachers], "ensemble_combine": ensemble.combine,
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    doc = write_report(args.out, classes=classes, labels=labels.numpy(), grey=grey.numpy(), names=names,
                       student_lp=s_lp.numpy(), ensemble_lp=e_lp.numpy(),
                       teacher_lps={n: m.numpy() for n, m in zip(teacher_names, member)},
                       meta=meta, efficiency=efficiency, timings=timings, max_examples=args.max_examples,
                       seen=seen, oof_ensemble_lp=None if oof_lp is None else oof_lp.numpy(),
                       oof_covered=None if oof_covered is None else oof_covered.numpy(),
                       heldout=heldout)
    _stage("metrics, figures, report.md, metrics.json", t0)
    s, e = doc["predictors"]["student"], doc["predictors"]["ensemble"]
    honest = "; ".join(f"{r['predictor']} {r['accuracy']:.4f} ({r['images']} images)" for r in doc["honest"])
    print(f"out-of-fold / held-out: {honest or 'none recorded'}", flush=True)
    print(f"in-sample where trained on: student accuracy {s['accuracy']:.4f}, ensemble accuracy {e['accuracy']:.4f}, "
          f"agreement {doc['student_vs_ensemble']['top1_agreement']:.4f}; report in {args.out} "
          f"({time.perf_counter() - t_all:.1f} s)", flush=True)


def _unique_names(folders: list[str]) -> list[str]:
    short = [Path(f).name for f in folders]
    return short if len(set(short)) == len(short) else [str(f) for f in folders]


# ----------------------------------------------------------------------------------------
# grader: exactly what the course server does
# ----------------------------------------------------------------------------------------
def cmd_grader(args) -> None:
    classes, _ = student_classes(args.weights)
    model = load_student_checked(args.arch, args.weights)   # fresh exec, strict CPU load, eval()
    # np.array(Image.open(path)) -> the course's to_grayscale, as the server reads each image
    x, labels = load_server_batch(args.data, classes)          # the WHOLE folder, ONE float32 batch
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:
        raise ContractError(f"{args.arch}: forward pass failed on input {tuple(x.shape)} "
                            f"({type(err).__name__}: {err})") from None
    check_output(out, len(x), len(classes), args.arch)
    correct = int((out.argmax(1) == labels).sum())
    print(f"accuracy: {correct / len(x):.4f} ({correct}/{len(x)})", flush=True)


# ----------------------------------------------------------------------------------------
# predict: unlabelled images -> CSV
# ----------------------------------------------------------------------------------------
def cmd_predict(args) -> None:
    ensure_writable_dir(Path(args.out).parent)
    paths = expand_images(args.images)
    if args.teachers is None:
        arch, weights = args.student
        classes, _ = student_classes(weights)
        model = load_student_checked(arch, weights)
        data = load_image_files(paths, progress=False)
        log_probs = student_log_probs(model, data.grey, len(classes), args.batch_size, arch)
    else:
        ensemble = load_ensemble(args.teachers)
        classes = ensemble.classes
        data = load_image_files(paths, progress=False)
        log_probs = predict_logits(ensemble, data.rgb, args.batch_size).log_softmax(1)
    prob, pred = log_probs.exp().max(1)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "class", "probability"])
    for p, c, q in zip(paths, pred.tolist(), prob.tolist()):
        writer.writerow([str(p), classes[c], f"{q:.6f}"])
    atomic_write_text(buf.getvalue(), args.out)
    print(f"{len(paths)} predictions written to {args.out}", flush=True)


def cmd_export(args) -> None:
    ensure_writable_dir(args.out)
    classes, _ = student_classes(args.weights)
    model = load_student_checked(args.arch, args.weights)
    if args.images:
        data = load_image_files(expand_images(args.images)[:args.n_check], progress=False)
        x, source = data.grey.float() / 255, f"{len(data)} real images"
    else:
        x = torch.rand((args.n_check, 1, 100, 100), generator=torch.Generator().manual_seed(0))
        source = f"{args.n_check} random images (pass --images for real ones)"
    with torch.no_grad():
        check_output(model(x[:2]), len(x[:2]), len(classes), args.arch)
    result = export_student(model, x, args.out, args.arch, args.opset)
    result.update({"parity_inputs": source, "classes": classes, "input": "(N, 1, 100, 100) float32 in [0, 1]",
                   "output": "(N, C) flip-averaged log-probabilities (eval mode)",
                   "arch": str(args.arch), "weights": str(args.weights)})
    atomic_write_json(result, Path(args.out) / "export.json")
    failed = []
    for kind in ("torchscript", "onnx"):
        d = result[kind]["max_abs_diff"]
        ok = d <= PARITY_TOLERANCE
        failed += [] if ok else [kind]
        print(f"{kind:11s} {result[kind]['path']}: max |output - eager| = {d:.2e} on {source} "
              f"({'ok' if ok else 'FAILED'}, tolerance {PARITY_TOLERANCE:g})", flush=True)
    if failed:
        raise SystemExit(f"error: {', '.join(failed)} export differs from eager PyTorch by more than "
                         f"{PARITY_TOLERANCE:g}")


# ----------------------------------------------------------------------------------------
# compare: runs side by side
# ----------------------------------------------------------------------------------------
def cmd_compare(args) -> None:
    from .report import markdown_table
    from .runlog import compare_runs
    table = compare_runs(args.runs)
    text = markdown_table(table)
    print(text, flush=True)
    if args.out:
        ensure_writable_dir(Path(args.out).parent)
        atomic_write_text(table.to_csv(index=False) if args.out.suffix.lower() == ".csv" else text + "\n", args.out)
        print(f"{len(table)} runs written to {args.out}", flush=True)


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    # one-line errors ("error: --flag: ..."), no guessing of abbreviated flags; subparsers inherit both
    parser = ConfigParser(prog="toolkit-evaluate", description=__doc__.split("\n")[0], formatter_class=fmt,
                          allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def student_args(p):
        p.add_argument("--arch", type=Path, default=Path("architecture.py"), help="student architecture.py")
        p.add_argument("--weights", type=Path, default=Path("model.pth"), help="student state_dict")

    p = sub.add_parser("report", formatter_class=fmt,
                       help="student vs each teacher vs ensemble: report.md, metrics.json, figures")
    p.add_argument("--data", type=Path, required=True, help="labelled course folder (labels.csv)")
    student_args(p)
    p.add_argument("--teachers", type=Path, nargs="+", default=None,
                   help="teacher folders (default: every folder under teachers/ with a teacher.pth)")
    p.add_argument("--out", type=Path, required=True, help="report folder, e.g. reports/NAME")
    p.add_argument("--indices-file", type=Path, default=None,
                   help=".pt/.json of sample indices (labels.csv order) to restrict to, e.g. a held-out fold")
    p.add_argument("--heldout", type=Path, nargs="+", default=None, metavar="PROVENANCE",
                   help="model.provenance.json of nested held-out student runs (distill.py --val-fold F, "
                        "e.g. runs/estimate_v0_s0/distilled/ from scripts/heldout_estimate.sh): reported first")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass [>= 1]")
    p.add_argument("--latency-runs", type=int, default=20,
                   help="timed batch-1 runs of the student (batch 256: a tenth; teachers: a quarter, batch 1 only); "
                        "0 skips latency")
    p.add_argument("--latency-threads", type=int, default=1,
                   help="torch threads while timing latency (1 = stable numbers on a busy machine)")
    p.add_argument("--max-examples", type=int, default=24, help="images in the student-wrong/ensemble-right grid")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("grader", formatter_class=fmt,
                       help="accuracy exactly as the course server computes it (whole folder, one batch)")
    p.add_argument("--data", type=Path, required=True, help="labelled course folder (labels.csv)")
    student_args(p)
    p.set_defaults(func=cmd_grader)

    p = sub.add_parser("predict", formatter_class=fmt, help="classify unlabelled images into a CSV")
    p.add_argument("--images", nargs="+", required=True, help="image files and/or folders of images")
    p.add_argument("--out", type=Path, required=True, help="CSV with columns file,class,probability")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--student", nargs=2, type=Path, metavar=("ARCH", "WEIGHTS"),
                     default=(Path("architecture.py"), Path("model.pth")),
                     help="predict with this architecture.py + model.pth (the default: the shipped student)")
    who.add_argument("--teachers", nargs="*", type=Path, metavar="DIR",
                     help="predict with the ensemble of these teacher folders (none given: all under teachers/)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass [>= 1]")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", formatter_class=fmt,
                       help="TorchScript + ONNX of the student, with parity checks against eager PyTorch")
    student_args(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--images", nargs="+", default=None,
                   help="real images (files/folders) for the parity check; default: random inputs")
    p.add_argument("--n-check", type=int, default=64, help="images used for the parity check")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compare", formatter_class=fmt,
                       help="runs side by side: the config values that differ and the final metrics")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                   help="run folders (holding log.json; folders above them are searched), e.g. runs/* teachers/*")
    p.add_argument("--out", type=Path, default=None, help="also write the table: .csv, or markdown otherwise")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> None:
    from .runlog import setup_logging
    setup_logging()
    try:
        args = build_parser().parse_args(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for name in ("batch_size", "n_check", "latency_threads"):
        if getattr(args, name, 1) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")
    if getattr(args, "latency_runs", 0) < 0:
        raise SystemExit("error: --latency-runs must be >= 0")
    try:
        if getattr(args, "out", None) is not None:  # a folder, or a CSV / table file: checked before any work
            problem = output_problem(args.out, is_dir=args.command in ("report", "export"))
            if problem:
                raise SystemExit(f"error: --out: {problem}")
        args.func(args)
    except DataError as err:  # also ContractError and TeacherError (subclasses)
        raise SystemExit(f"error: {err}") from None
    except PermissionError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    from .cli import run_main
    run_main(main, resume_hint="nothing was written; run the command again")
