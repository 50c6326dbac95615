"""The default recipe end to end: k fold teachers -> distillation -> model.pth -> report.

    python pipeline.py --data ../shared/data/training_data     (./run.sh does set-up + this)

Why this recipe (measured on this 2-core CPU, see README):
  * teachers: EfficientNet-Lite0 from offline ImageNet weights, RGB 160 px, stem + 5 stages
    frozen and their features computed once for 8 views of every image, so the trunk's cost
    is paid once and shared by all folds' teachers and by the soft-target pass;
  * one teacher per fold of a 5-fold split: each labels the fold it never saw, because
    soft labels a teacher gives its own training images are over-confident;
  * the student (architecture.py: EfficientNet-Lite0 with a grey stem, the server's 100 px
    upsampled to 128 inside the model (+2.5 points on fold 0), from ImageNet weights, stem +
    2 stages frozen and cached like the teachers' trunk) learns
    from those out-of-fold ensemble targets on exactly the views they were computed for, with
    class-balanced sampling (KD, T = 1, alpha = 0.5), for 10 epochs (fold-0 accuracy plateaus
    from epoch 7).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

import distill
import train_teacher
from toolkit.cli import run_main
from toolkit.config import check_timm_model, option, parse_config
from toolkit.data import load_course_folder
from toolkit.io import atomic_write_json, atomic_write_text


@dataclass
class PipelineConfig:
    """Run the whole default recipe: teachers -> distillation -> model.pth -> report."""
    data: str = option("../shared/data/training_data", "labelled course folder (labels.csv + images)",
                       path="in_dir")
    teachers_root: str = option("teachers", "where the fold teachers are written (and reused from)",
                                path="out_dir")
    teacher_model: str = option("efficientnet_lite0", "timm backbone of the teachers", check=check_timm_model)
    pretrained: str = option("offline", "teachers' start weights", choices=("hub", "offline", "none"),
                             or_file=True)
    teacher_epochs: int = option(6, "epochs per fold teacher", min=1)
    folds: int = option(5, "fold teachers (k of the k-fold split)", min=2)
    views: int = option(8, "cached views per image", min=1)
    student_epochs: int = option(10, "student epochs", min=1)
    seed: int = option(0, "seed of the split, teachers, student and views", min=0)
    out: str = option("model.pth", "the student's state_dict (replaced only by a finished run)", path="out_file")
    work_dir: str = option("runs/pipeline", "distillation work folder, timings.json", path="out_dir")
    report_dir: str = option("reports/pipeline", "evaluation report folder", path="out_dir")
    reuse_teachers: bool = option(True, "keep fold teachers that already exist under teachers_root")
    report: bool = option(True, "write the evaluation report at the end")


def main(argv=None) -> dict:
    cfg = parse_config(PipelineConfig, argv)
    work = Path(cfg.work_dir)
    timings: dict[str, float] = {}

    def stage(name, fn):
        print(f"\n=== {name}", flush=True)
        t0 = time.time()
        result = fn()
        timings[name] = round(time.time() - t0, 1)
        print(f"=== {name}: {timings[name]:.0f} s", flush=True)
        return result

    stage("decode data (cached)", lambda: load_course_folder(cfg.data))
    for fold in range(cfg.folds):
        folder = Path(cfg.teachers_root) / f"{cfg.teacher_model.replace('efficientnet_', '')}_f{fold}"
        if cfg.reuse_teachers and (folder / "teacher.pth").is_file():
            print(f"reusing teacher {folder}", flush=True)
            continue
        stage(f"teacher fold {fold}", lambda: train_teacher.main([
            "--data", cfg.data, "--model", cfg.teacher_model, "--pretrained", cfg.pretrained,
            "--epochs", str(cfg.teacher_epochs), "--views", str(cfg.views), "--folds", str(cfg.folds),
            "--fold", str(fold), "--seed", str(cfg.seed), "--out", str(folder)]))
    stage("distil student", lambda: distill.main([
        "--data", cfg.data, "--teachers-root", cfg.teachers_root, "--views", str(cfg.views),
        "--folds", str(cfg.folds), "--val-fold", "-1", "--epochs", str(cfg.student_epochs),
        "--seed", str(cfg.seed), "--view-seed", str(cfg.seed), "--out", cfg.out,
        "--work-dir", str(work / "distill")]))
    if cfg.report:
        from toolkit import evaluate
        from toolkit.teachers import find_teacher_folders
        # In-sample for the shipped student (it trained on every image): scripts/heldout_estimate.sh
        # gives the honest held-out figures.
        teacher_dirs = [str(p) for p in find_teacher_folders(cfg.teachers_root)]
        stage("evaluation report", lambda: evaluate.main([
            "report", "--data", cfg.data, "--weights", cfg.out, "--out", cfg.report_dir,
            "--teachers", *teacher_dirs]))

    timings["total"] = round(sum(timings.values()), 1)
    atomic_write_json({"config": asdict(cfg), "seconds": timings}, work / "timings.json")
    atomic_write_text(yaml.safe_dump(asdict(cfg), sort_keys=False), work / "config.yaml")  # replays with --config
    print("\nstage                          seconds")
    for name, seconds in timings.items():
        print(f"{name:<30} {seconds:>7.0f}")
    return timings


if __name__ == "__main__":
    run_main(main, resume_hint="finished fold teachers are kept: run the same command again to reuse them")
