"""One command to evaluate the student against each teacher and their ensemble.

    python -m toolkit.evaluate report  --data FOLDER [--arch architecture.py] [--weights model.pth]
                                       [--teachers DIR ...] --out reports/NAME
                                       [--indices-file held_out.pt|.json] [--batch-size 256]
    python -m toolkit.evaluate grader  --data FOLDER [--arch architecture.py] [--weights model.pth]
    python -m toolkit.evaluate predict --images FILE_OR_FOLDER [...] --out preds.csv
                                       (--student ARCH WEIGHTS | --teachers [DIR ...])
    python -m toolkit.evaluate export  [--arch architecture.py] [--weights model.pth] --out DIR
                                       [--images FILE_OR_FOLDER ...]

(also installed as the console script ``toolkit-evaluate``). Every bad input ends the
command with one line ``error: <culprit>: <what is wrong>``.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import io
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch

from .data import DataError, list_images, load_course_folder, load_image_files
from .io import atomic_write_json, atomic_write_text, ensure_writable_dir
from .student import ContractError, load_student
from .backbones import TeacherError
from .ensemble import Ensemble, members_identity_logits
from .teachers import find_teacher_folders, load_teacher, predict_logits

# The course's classes; ids are their sorted order, as the grading server assigns them.
CLASSES = ["book", "bottle", "car", "cat", "chair", "computermouse", "cup", "dog", "flower", "fork",
           "glass", "glasses", "headphones", "knife", "laptop", "pen", "plate", "shoes", "spoon", "tree"]
PARITY_TOLERANCE = 1e-4


# ----------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------
def student_classes(weights: str | Path) -> tuple[list[str], str]:
    """The student's class list and where it came from: ``classes`` of the provenance file
    next to the weights (model.provenance.json, written by distill.py) or CLASSES."""
    prov = Path(weights).with_suffix(".provenance.json")
    if prov.is_file():
        try:
            classes = json.loads(prov.read_text()).get("classes")
        except (OSError, ValueError, AttributeError) as err:
            raise DataError(f"{prov}: unreadable provenance file ({type(err).__name__}: {err})") from None
        if classes is not None:
            if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
                raise DataError(f"{prov}: 'classes' is not a non-empty list of class names")
            return classes, str(prov)
    return list(CLASSES), "toolkit.evaluate.CLASSES"


def load_student_checked(arch: str | Path, weights: str | Path) -> torch.nn.Module:
    """toolkit.student.load_student, with any failure of architecture.py turned into one line."""
    try:
        return load_student(arch, weights)
    except ContractError as err:
        if "does not fit" in str(err):  # torch's message lists every key: summarise it
            raise ContractError(_mismatch_summary(arch, weights)) from None
        raise
    except DataError:
        raise
    except Exception as err:  # SyntaxError, NameError, bad constructor args ... in architecture.py
        raise ContractError(f"{arch}: building the model failed ({type(err).__name__}: {err})") from None


def _mismatch_summary(arch, weights) -> str:
    from .student import exec_architecture
    state = torch.load(weights, map_location="cpu")
    ref = exec_architecture(arch)["model"].state_dict()

    def some(keys):
        keys = sorted(keys)
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    missing, extra = set(ref) - set(state), set(state) - set(ref)
    wrong = [f"{k} {tuple(getattr(state[k], 'shape', ()))} (architecture: {tuple(ref[k].shape)})"
             for k in sorted(set(ref) & set(state))
             if not torch.is_tensor(state[k]) or state[k].shape != ref[k].shape]
    parts = [f"shape differs for {some(wrong)}" if wrong else "",
             f"missing keys: {some(missing)}" if missing else "",
             f"unexpected keys: {some(extra)}" if extra else ""]
    return f"{weights}: does not fit {arch}: " + "; ".join(p for p in parts if p)


def _check_output(out, n: int, num_classes: int, arch) -> None:
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ContractError(f"{arch}: model output is {shape}, expected ({n}, {num_classes}) "
                            f"for {num_classes} classes")


@torch.no_grad()
def student_log_probs(model: torch.nn.Module, grey_u8: torch.Tensor, num_classes: int,
                      batch_size: int = 256, arch: str | Path = "architecture.py") -> torch.Tensor:
    """Student on the server's input (grey uint8 / 255, float32) -> (N, C) log-probabilities."""
    model.eval()
    outs = []
    for i in range(0, len(grey_u8), batch_size):
        x = grey_u8[i:i + batch_size].float() / 255
        try:
            out = model(x)
        except Exception as err:
            raise ContractError(f"{arch}: forward pass failed on input {tuple(x.shape)} "
                                f"({type(err).__name__}: {err})") from None
        _check_output(out, len(x), num_classes, arch)
        outs.append(out.float())
    return torch.cat(outs).log_softmax(1)


def load_teachers(folders) -> tuple[list, Ensemble]:
    folders = [Path(f) for f in folders] if folders else find_teacher_folders("teachers")
    if not folders:
        raise TeacherError("teachers: no teacher folders (each needs a teacher.pth); pass --teachers DIR ...")
    teachers = [load_teacher(f) for f in folders]
    return teachers, Ensemble(teachers)


def load_indices(path: str | Path, n: int) -> torch.Tensor:
    """Sample indices (positions in labels.csv order) from .pt / .json: a list, a 1-D tensor,
    a boolean mask of length n, or a dict holding one under 'indices' / 'val_idx' / 'idx'."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: indices file not found")
    if path.suffix.lower() not in (".pt", ".pth", ".json"):
        raise DataError(f"{path}: indices file must be .pt/.pth or .json")
    try:
        obj = (json.loads(path.read_text()) if path.suffix.lower() == ".json"
               else torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:
        raise DataError(f"{path}: unreadable indices file ({type(err).__name__}: {err})") from None
    if isinstance(obj, dict):
        key = next((k for k in ("indices", "val_idx", "idx", "val_indices") if k in obj), None)
        if key is None:
            raise DataError(f"{path}: no 'indices' key (keys: {', '.join(map(str, obj))})")
        obj = obj[key]
    try:
        idx = torch.as_tensor(obj)
    except Exception:
        raise DataError(f"{path}: indices must be a list of integers") from None
    if idx.dtype == torch.bool:
        if idx.shape != (n,):
            raise DataError(f"{path}: boolean mask has shape {tuple(idx.shape)}, the folder has {n} images")
        idx = idx.nonzero().flatten()
    if idx.dim() != 1 or idx.is_floating_point() or idx.is_complex():
        raise DataError(f"{path}: indices must be a 1-D list of integers, got {idx.dtype} {tuple(idx.shape)}")
    if len(idx) == 0:
        raise DataError(f"{path}: no indices")
    if idx.min() < 0 or idx.max() >= n:
        bad = int(idx[(idx < 0) | (idx >= n)][0])
        raise DataError(f"{path}: index {bad} out of range for a folder of {n} images")
    if len(torch.unique(idx)) != len(idx):
        raise DataError(f"{path}: duplicate indices")
    return idx.long()


def expand_images(items: list[str]) -> list[Path]:
    """Files as given, folders -> their images (sorted); missing -> DataError."""
    paths = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = [p / name for name in list_images(p)]
            if not found:
                raise DataError(f"{p}: folder holds no .jpg/.jpeg/.png images")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise DataError(f"{p}: no such image file or folder")
    return paths


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stage(msg: str, t0: float) -> float:
    dt = time.perf_counter() - t0
    print(f"{msg} ({dt:.1f} s)", flush=True)
    return dt


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------
def model_cost(model: torch.nn.Module, batch: torch.Tensor, runs_b1: int, runs_b256: int,
               threads: int = 1) -> dict:
    """Parameters, MACs per image and CPU latency (batch 1 and 256) on real inputs.

    Latency runs with ``threads`` torch threads (restored afterwards): on a machine whose
    cores are busy with other work, several threads wait for each other and the numbers
    become meaningless (measured here: 2 threads 50x slower than 1 on a loaded 2-core box).
    """
    from . import metrics as M
    cost = {"parameters": M.parameter_count(model), "macs_per_image": M.count_macs(model, batch[:1])}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if runs_b1 > 0:
            cost["latency_batch1"] = M.latency(model, batch[:1], runs=runs_b1, warmup=2)
        if runs_b256 > 0:
            big = batch.repeat(math.ceil(256 / len(batch)), 1, 1, 1)[:256]
            cost["latency_batch256"] = M.latency(model, big, runs=runs_b256, warmup=1)
    finally:
        torch.set_num_threads(before)
    if runs_b1 > 0 or runs_b256 > 0:
        cost["latency_threads"] = threads
    return cost


def cmd_report(args) -> None:
    from .report import write_report
    timings = {}
    t_all = t0 = time.perf_counter()
    ensure_writable_dir(args.out)  # fail now, not after the predictions
    teachers, ensemble = load_teachers(args.teachers)
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
            "weights_sha256": _sha256(Path(args.weights)), "classes_source": classes_source,
            "teachers": [t.folder for t in teachers], "ensemble_combine": ensemble.combine,
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    doc = write_report(args.out, classes=classes, labels=labels.numpy(), grey=grey.numpy(), names=names,
                       student_lp=s_lp.numpy(), ensemble_lp=e_lp.numpy(),
                       teacher_lps={n: m.numpy() for n, m in zip(teacher_names, member)},
                       meta=meta, efficiency=efficiency, timings=timings, max_examples=args.max_examples)
    _stage("metrics, figures, report.md, metrics.json", t0)
    s, e = doc["predictors"]["student"], doc["predictors"]["ensemble"]
    print(f"student accuracy {s['accuracy']:.4f}, ensemble accuracy {e['accuracy']:.4f}, agreement "
          f"{doc['student_vs_ensemble']['top1_agreement']:.4f}; report in {args.out} "
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
    data = load_course_folder(args.data, classes=classes, progress=False)
    x = data.grey.float() / 255                               # the WHOLE folder, ONE float32 batch
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:
        raise ContractError(f"{args.arch}: forward pass failed on input {tuple(x.shape)} "
                            f"({type(err).__name__}: {err})") from None
    _check_output(out, len(x), len(classes), args.arch)
    correct = int((out.argmax(1) == data.labels).sum())
    print(f"accuracy: {correct / len(x):.4f} ({correct}/{len(x)})", flush=True)


# ----------------------------------------------------------------------------------------
# predict: unlabelled images -> CSV
# ----------------------------------------------------------------------------------------
def cmd_predict(args) -> None:
    ensure_writable_dir(Path(args.out).parent)
    paths = expand_images(args.images)
    if args.student:
        arch, weights = args.student
        classes, _ = student_classes(weights)
        model = load_student_checked(arch, weights)
        data = load_image_files(paths, progress=False)
        log_probs = student_log_probs(model, data.grey, len(classes), args.batch_size, arch)
    else:
        _, ensemble = load_teachers(args.teachers)
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


# ----------------------------------------------------------------------------------------
# export: TorchScript + ONNX with parity checks
# ----------------------------------------------------------------------------------------
class ExportWrapper(torch.nn.Module):
    """The student's eval-mode computation (one chunk, any batch size) as one traceable graph.

    MyCNN.forward splits big batches into chunks with a Python loop whose length a trace
    would freeze; the exported graph takes any batch at once via ``_eval_logits`` instead.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(self, x):
        fn = getattr(self.model, "_eval_logits", None)
        return fn(x) if callable(fn) else self.model(x)


def export_student(model: torch.nn.Module, parity_inputs: torch.Tensor, out_dir: str | Path,
                   arch: str | Path = "architecture.py", opset: int = 17) -> dict:
    """Write out_dir/student.torchscript.pt and out_dir/student.onnx; return the max abs
    difference of each (reloaded from disk) to the eager model on ``parity_inputs`` and on
    its first image alone (so the dynamic batch dimension is checked too)."""
    import onnx
    import onnxruntime as ort
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    wrapper = ExportWrapper(model).eval()
    example = parity_inputs[:2]
    batches = [parity_inputs, parity_inputs[:1]]
    with torch.no_grad():
        refs = [model(b).float() for b in batches]

    ts_path, onnx_path = out_dir / "student.torchscript.pt", out_dir / "student.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit deprecation + TracerWarnings on the channel check
        try:
            with torch.no_grad():
                traced = torch.jit.trace(wrapper, example, check_trace=False)
            tmp = ts_path.with_name(f".{ts_path.name}.tmp")
            torch.jit.save(traced, str(tmp))
            os.replace(tmp, ts_path)
        except Exception as err:
            raise ContractError(f"{arch}: TorchScript trace failed ({type(err).__name__}: {err})") from None
        try:
            tmp = onnx_path.with_name(f".{onnx_path.name}.tmp")
            torch.onnx.export(wrapper, (example,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
            onnx.checker.check_model(str(tmp))
            os.replace(tmp, onnx_path)
        except Exception as err:
            raise ContractError(f"{arch}: ONNX export failed ({type(err).__name__}: {err})") from None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
        loaded = torch.jit.load(str(ts_path), map_location="cpu").eval()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ts_diff = max(float((loaded(b).float() - r).abs().max()) for b, r in zip(batches, refs))
    onnx_diff = max(float(abs(session.run(None, {"image": b.numpy()})[0] - r.numpy()).max())
                    for b, r in zip(batches, refs))
    return {"torchscript": {"path": str(ts_path), "max_abs_diff": ts_diff},
            "onnx": {"path": str(onnx_path), "max_abs_diff": onnx_diff, "opset": opset},
            "parity_images": len(parity_inputs), "tolerance": PARITY_TOLERANCE}


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
        _check_output(model(x[:2]), len(x[:2]), len(classes), args.arch)
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
# CLI
# ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="toolkit-evaluate", description=__doc__.split("\n")[0],
                                     formatter_class=fmt)
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
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--latency-runs", type=int, default=20,
                   help="timed batch-1 runs of the student (batch 256: a tenth; teachers: a quarter, batch 1 only); 0 skips latency")
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
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--student", nargs=2, type=Path, metavar=("ARCH", "WEIGHTS"),
                     help="predict with architecture.py + model.pth")
    who.add_argument("--teachers", nargs="*", type=Path, metavar="DIR",
                     help="predict with the ensemble of these teacher folders (none given: all under teachers/)")
    p.add_argument("--batch-size", type=int, default=256)
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
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "n_check", "latency_threads"):
        if getattr(args, name, 1) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1")
    if getattr(args, "latency_runs", 0) < 0:
        raise SystemExit("error: --latency-runs must be >= 0")
    try:
        args.func(args)
    except DataError as err:  # also ContractError and TeacherError (subclasses)
        raise SystemExit(f"error: {err}") from None
    except PermissionError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
