"""The default recipe end to end: k fold teachers -> distillation -> model.pth -> report.

    python pipeline.py --data ../shared/data/training_data     (./run.sh does set-up + this)

Why this recipe (measured on this 2-core CPU, see README, issue 12):
  * teachers larger and sharper than the student: EfficientNet-Lite0 and -Lite2 from offline
    ImageNet weights, RGB 224 px (resolution was the lever: lite0 160 -> 224 px is +3.9 points
    on fold 0; Lite2 adds a point and diversity), stem + 5 stages frozen and their features
    computed once for 2 views of every image, shared by all folds' teachers and by the
    soft-target pass (freezing a 6th stage costs 2.5-3 points per teacher);
  * 3 fold teachers per recipe: each labels the fold it never saw, because soft labels a
    teacher gives its own training images are over-confident; 3 rather than 5 folds keeps the
    whole run within 2 hours on 2 cores (each teacher trains on 2/3 of the images, close to
    the 3/5 of the nested 5-fold estimate);
  * the student (architecture.py: EfficientNet-Lite0 with a grey stem, the server's 100 px
    upsampled to 144 inside the model (+2 points over 128 on nested fold 0), from ImageNet
    weights, stem + 2 stages frozen and cached like the teachers' trunk) learns from those
    out-of-fold ensemble targets on exactly the views they were computed for, with
    class-balanced sampling (KD, T = 1, alpha = 0.5), for 10 epochs.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

import distill
import train_teacher
from toolkit.cli import run_main
from toolkit.config import ConfigError, option, parse_config
from toolkit.data import DataError, load_course_folder
from toolkit.io import atomic_write_json, atomic_write_text
from toolkit.runlog import setup_logging


@dataclass
class PipelineConfig:
    """Run the whole default recipe: teachers -> distillation -> model.pth -> report."""
    data: str = option("../shared/data/training_data", "labelled course folder (labels.csv + images)",
                       path="in_dir")
    teachers_root: str = option("teachers", "where the fold teachers are written (and reused from)",
                                path="out_dir")
    # Each recipe is trained as `folds` fold teachers (teachers_root/<name>_f<fold>); the ensemble
    # is every fold teacher of every recipe.
    teacher_recipes: list[str] = option(["efficientnet_lite0@224", "efficientnet_lite2@224"],
                                        "teacher recipes MODEL@SIZE[:flag=value,...] with flags of "
                                        "train_teacher.py, e.g. efficientnet_lite2@260:epochs=8")
    pretrained: str = option("offline", "teachers' start weights", choices=("hub", "offline", "none"),
                             or_file=True)
    teacher_epochs: int = option(6, "epochs per fold teacher, unless a recipe sets its own", min=1)
    folds: int = option(3, "fold teachers per recipe (k of the k-fold split)", min=2)
    views: int = option(2, "cached views per image", min=1)
    student_epochs: int = option(10, "student epochs", min=1)
    seed: int = option(0, "seed of the split, teachers, student and views", min=0)
    out: str = option("model.pth", "the student's state_dict (replaced only by a finished run)", path="out_file")
    work_dir: str = option("runs/pipeline", "distillation work folder, timings.json, config.yaml", path="out_dir")
    report_dir: str = option("reports/pipeline", "evaluation report folder", path="out_dir")
    heldout_fold: int = option(-1, "nested estimate: no teacher and no student trains on this fold, the "
                               "student's val fold (-1: none; the shipped student trains on every image)", min=-1)
    scratch_control: bool = option(False, "also train the same student on hard labels only (distill.py "
                                   "--scratch), into work_dir/scratch: the control distillation must beat")
    reuse_teachers: bool = option(True, "keep fold teachers that already exist under teachers_root")
    report: bool = option(True, "write the evaluation report at the end")

    def check(self):
        """Every recipe parses and its flags pass train_teacher.py's checks, before any teacher trains."""
        if self.heldout_fold >= self.folds:
            return "heldout_fold", f"fold {self.heldout_fold} does not exist in a {self.folds}-fold split"
        if not self.teacher_recipes:
            return "teacher_recipes", "no recipe given"
        for recipe in self.teacher_recipes:
            try:
                _, flags = parse_recipe(recipe)
                parse_config(train_teacher.TeacherConfig, ["--data", self.data, "--out", self.teachers_root,
                                                           "--pretrained", self.pretrained, *flags])
            except ConfigError as err:  # a flag of the recipe
                return "teacher_recipes", f"{recipe!r}: {err}"
            except DataError as err:  # the recipe's own form
                return "teacher_recipes", str(err).removeprefix("--teacher-recipes ")
        return None


def main(argv=None) -> dict:
    cfg = parse_config(PipelineConfig, argv)
    setup_logging()
    work = Path(cfg.work_dir)
    timings: dict[str, float] = {}

    def stage(name, fn):
        print(f"\n=== {name}", flush=True)
        t0 = time.time()
        result = fn()
        timings[name] = round(time.time() - t0, 1)
        print(f"=== {name}: {timings[name]:.0f} s", flush=True)
        return result

    recipes = [parse_recipe(r) for r in cfg.teacher_recipes]  # (folder name, flags); checked by PipelineConfig
    stage("decode data (cached)", lambda: load_course_folder(cfg.data))
    nested = ["--exclude-folds", str(cfg.heldout_fold)] if cfg.heldout_fold >= 0 else []
    for name, flags in recipes:
        for fold in (f for f in range(cfg.folds) if f != cfg.heldout_fold):
            folder = Path(cfg.teachers_root) / f"{name}_f{fold}"
            if cfg.reuse_teachers and (folder / "teacher.pth").is_file():
                print(f"reusing teacher {folder}", flush=True)
                continue
            stage(f"teacher {name} fold {fold}", lambda: train_teacher.main([
                "--data", cfg.data, "--pretrained", cfg.pretrained, "--epochs", str(cfg.teacher_epochs),
                "--views", str(cfg.views), "--folds", str(cfg.folds), "--fold", str(fold),
                "--seed", str(cfg.seed), "--out", str(folder), *nested, *flags]))
    student = ["--data", cfg.data, "--views", str(cfg.views), "--folds", str(cfg.folds),
               "--val-fold", str(cfg.heldout_fold), "--epochs", str(cfg.student_epochs),
               "--seed", str(cfg.seed), "--view-seed", str(cfg.seed)]
    stage("distil student", lambda: distill.main([
        *student, "--teachers-root", cfg.teachers_root, "--out", cfg.out, "--work-dir", str(work / "distill")]))
    if cfg.scratch_control:
        stage("hard-label control", lambda: distill.main([
            *student, "--scratch", "--out", str(work / "scratch" / "model.pth"), "--work-dir", str(work / "scratch")]))
    if cfg.report:
        from toolkit import evaluate
        from toolkit.estimates import find_heldout
        from toolkit.teachers import find_teacher_folders
        # The report leads with the fold teachers' and the ensemble's out-of-fold accuracies and
        # any nested held-out student estimate scripts/heldout_estimate.sh left under runs/; the
        # shipped student trained on every image, so its own scores there are in-sample.
        teacher_dirs = [str(p) for p in find_teacher_folders(cfg.teachers_root)]
        heldout = [str(p) for p in find_heldout("runs")]
        stage("evaluation report", lambda: evaluate.main([
            "report", "--data", cfg.data, "--weights", cfg.out, "--out", cfg.report_dir,
            "--teachers", *teacher_dirs, *(["--heldout", *heldout] if heldout else [])]))

    timings["total"] = round(sum(timings.values()), 1)
    atomic_write_json({"config": asdict(cfg), "seconds": timings}, work / "timings.json")
    atomic_write_text(yaml.safe_dump(asdict(cfg), sort_keys=False), work / "config.yaml")  # replays with --config
    print("\nstage                          seconds")
    for name, seconds in timings.items():
        print(f"{name:<30} {seconds:>7.0f}")
    return timings


def parse_recipe(recipe: str) -> tuple[str, list[str]]:
    """'efficientnet_lite2@260:epochs=8,frozen_stages=5' -> ('lite2_260px', [train_teacher flags]);
    later flags win, so a recipe's own epochs override --teacher-epochs."""
    head, _, extra = recipe.partition(":")
    model, _, size = head.partition("@")
    if not model or not size.isdigit():
        raise DataError(f"--teacher-recipes {recipe!r}: expected MODEL@SIZE[:flag=value,...]")
    flags = ["--model", model, "--input-size", size]
    for item in filter(None, extra.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise DataError(f"--teacher-recipes {recipe!r}: {item!r} is not flag=value")
        flags += ["--" + key.strip().replace("_", "-"), value.strip()]
    return f"{model.replace('efficientnet_', '')}_{size}px", flags


def cli() -> None:
    """The console script ``toolkit-pipeline`` (pyproject.toml)."""
    run_main(main, resume_hint="finished fold teachers are kept: run the same command again to reuse them")


if __name__ == "__main__":
    cli()
