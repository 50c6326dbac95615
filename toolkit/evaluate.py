"""One command to evaluate the student against each teacher and their ensemble.

    python -m toolkit.evaluate report  --data FOLDER [--arch architecture.py] [--weights model.pth]
                                       [--teachers DIR ...] --out reports/NAME
                                       [--indices-file held_out.pt|.json] [--heldout PROVENANCE ...]
    python -m toolkit.evaluate grader  --data FOLDER [--arch architecture.py] [--weights model.pth]
    python -m toolkit.evaluate predict --images FILE_OR_FOLDER [...] --out preds.csv
                                       [--student ARCH WEIGHTS | --ensemble [--teachers DIR ...]]
                                       (default: the shipped student, architecture.py + model.pth)
    python -m toolkit.evaluate export  [--arch architecture.py] [--weights model.pth] --out DIR
                                       [--images FILE_OR_FOLDER ...]
    python -m toolkit.evaluate compare RUN [RUN ...] [--out table.csv|table.md]

(also installed as the console script ``toolkit-evaluate``). Each command's flags are made from
its dataclass below, like the training scripts' (``toolkit.config``): a bad command or flag ends
with one line ``error: <culprit>: <what is wrong>`` and exit code 2 before any work; anything
found while running (data, teachers, the architecture) with one line and exit code 1.
"""
from __future__ import annotations

import csv
import datetime
import io
import logging
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import torch

from .backbones import TeacherError
from .cli import one_line
from .config import REQUIRED, ConfigError, option, parse_command
from .data import DataError, load_course_folder, load_image_files
from .ensemble import load_ensemble, members_identity_logits
from .estimates import oof_ensemble_log_probs, read_heldout, student_seen, teacher_seen
from .export import PARITY_TOLERANCE, export_student
from .files import expand_images, load_indices, sha256_file
from .grader import load_server_batch
from .io import atomic_write_json, atomic_write_text, ensure_writable_dir
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
# CLI: one dataclass per command (flags, help, defaults and checks made from its fields)
# ----------------------------------------------------------------------------------------
def _student_pair(value: list[str]) -> str | None:
    return None if len(value) == 2 else f"expected ARCH WEIGHTS (2 paths), got {len(value)}"


@dataclass(kw_only=True)
class StudentFiles:
    arch: str = option("architecture.py", "the student's architecture file (defines model = MyCNN(...))")
    weights: str = option("model.pth", "the student's state_dict")


@dataclass(kw_only=True)
class ReportConfig(StudentFiles):
    """student vs each teacher vs ensemble: report.md, metrics.json, figures"""
    data: str = option(REQUIRED, "labelled course folder (labels.csv + images)", path="in_dir")
    teachers: list[str] = option([], "teacher folders (none given: every folder under teachers/ with a teacher.pth)")
    out: str = option(REQUIRED, "report folder, e.g. reports/NAME", path="out_dir")
    indices_file: str = option("", ".pt/.json of sample indices (labels.csv order) to restrict to, e.g. a held-out "
                               "fold (empty: every image)", path="in_file")
    heldout: list[str] = option([], "model.provenance.json of nested held-out student runs (distill.py --val-fold F, "
                                "e.g. from scripts/heldout_estimate.sh): reported first")
    batch_size: int = option(256, "images per forward pass", min=1)
    latency_runs: int = option(20, "timed batch-1 runs of the student (batch 256: a tenth; teachers: a quarter, "
                               "batch 1 only); 0 skips latency", min=0)
    latency_threads: int = option(1, "torch threads while timing latency (1 = stable numbers on a busy machine)",
                                  min=1)
    max_examples: int = option(24, "images in the student-wrong/ensemble-right grid", min=0)


@dataclass(kw_only=True)
class GraderConfig(StudentFiles):
    """accuracy exactly as the course server computes it (whole folder, one batch)"""
    data: str = option(REQUIRED, "labelled course folder (labels.csv + images)", path="in_dir")


@dataclass(kw_only=True)
class PredictConfig:
    """classify unlabelled images into a CSV"""
    images: list[str] = option(REQUIRED, "image files and/or folders of images")
    out: str = option(REQUIRED, "CSV with columns file,class,probability", path="out_file")
    student: list[str] = option(["architecture.py", "model.pth"], "predict with this student ARCH WEIGHTS",
                                check=_student_pair)
    teachers: list[str] = option([], "predict with the ensemble of these teacher folders instead of the student")
    ensemble: bool = option(False, "predict with the teachers' ensemble: --teachers, or every folder under "
                            "teachers/ with a teacher.pth")
    batch_size: int = option(256, "images per forward pass", min=1)

    def check(self):
        shipped = next(f.default_factory() for f in fields(self) if f.name == "student")
        if (self.teachers or self.ensemble) and self.student != shipped:
            return "student", "predicts with the student; --teachers / --ensemble with the ensemble: give one"
        return None


@dataclass(kw_only=True)
class ExportConfig(StudentFiles):
    """TorchScript + ONNX of the student, with parity checks against eager PyTorch"""
    out: str = option(REQUIRED, "output folder", path="out_dir")
    images: list[str] = option([], "real images (files/folders) for the parity check (none: random inputs)")
    n_check: int = option(64, "images used for the parity check", min=1)
    opset: int = option(17, "ONNX opset", min=7)


@dataclass(kw_only=True)
class CompareConfig:
    """runs side by side: the config values that differ and the final metrics"""
    runs: list[str] = option(REQUIRED, "run folders (holding log.json; folders above them are searched), e.g. "
                             "runs/* teachers/*", positional=True)
    out: str = option("", "also write the table: .csv, or markdown otherwise (empty: print it only)",
                      path="out_file")


COMMANDS = {"report": (ReportConfig, cmd_report), "grader": (GraderConfig, cmd_grader),
            "predict": (PredictConfig, cmd_predict), "export": (ExportConfig, cmd_export),
            "compare": (CompareConfig, cmd_compare)}
PATH_FIELDS = ("arch", "weights", "data", "out", "indices_file")


def parse_args(argv: list[str] | None = None):
    """argv -> (the command's function, its arguments: the config's fields, paths as Path, an
    empty path as None); ConfigError for a bad command or flag."""
    name, cfg = parse_command({k: cls for k, (cls, _) in COMMANDS.items()}, argv, prog="toolkit-evaluate",
                              description=__doc__.split("\n")[0])
    args = {k: (Path(v) if v else None) if k in PATH_FIELDS else v for k, v in asdict(cfg).items()}
    if "teachers" in args:  # report: None = every teacher under teachers/; predict: None = the student
        use = args["teachers"] or (name == "report" or args.get("ensemble"))
        args["teachers"] = [Path(t) for t in args["teachers"]] if use else None
    if "student" in args:
        args["student"] = tuple(Path(p) for p in args["student"])
    if "runs" in args:
        args["runs"] = [Path(r) for r in args["runs"]]
    return COMMANDS[name][1], SimpleNamespace(command=name, **args)


def main(argv: list[str] | None = None) -> None:
    from .runlog import setup_logging
    setup_logging()
    try:
        func, args = parse_args(argv)
    except ConfigError as err:  # every bad command or flag: one line, exit 2, before any work
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        func(args)
    except DataError as err:  # also ContractError and TeacherError (subclasses)
        raise SystemExit(f"error: {err}") from None
    except PermissionError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    from .cli import run_main
    run_main(main, resume_hint="nothing was written; run the command again")
