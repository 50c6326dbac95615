"""The recipe end to end: teachers -> distillation -> model.pth -> report; resumable.

    python pipeline.py                       (./run.sh does set-up + this)
    python pipeline.py --recipe alt.yaml     (another recipe: toolkit/recipe.py says what one holds)

What is trained is the recipe (toolkit/recipe.py, or --recipe FILE): this script passes the
other two nothing but paths, the fold, the teacher's name in the recipe and the seed.

Run the same command again after a kill, a crash or a full disk and it continues: finished
teachers are reused, a half-trained teacher or student resumes from its checkpoint, completely
written caches are reused (a dead writer's temp files are removed and rebuilt), so model.pth
comes out byte-identical to an uninterrupted run. One line per stage says what it reused,
resumed or ran; a second run on the same folders is refused while this one holds them.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

import distill
import train_teacher
from toolkit.cli import run_main
from toolkit.config import check_recipe_path, option, parse_config
from toolkit.data import DataError, load_course_folder
from toolkit.engine import CHECKPOINT, compared_config
from toolkit.io import atomic_write_json, atomic_write_text
from toolkit.locks import hold_locks
from toolkit.recipe import fold_suffix, load_recipe
from toolkit.runlog import setup_logging
from toolkit.teachers import TEACHER_FILE


@dataclass
class PipelineConfig:
    """Run the whole recipe: teachers -> distillation -> model.pth -> report (resumable)."""
    RENAMED = {"scratch_control": "hard_label_control"}  # old spelling -> field: a one-line hint
    data: str = option("../shared/data/training_data", "labelled course folder (labels.csv + images)",
                       path="in_dir")
    recipe: str = option("", "recipe file (YAML): what differs from the default recipe (toolkit/recipe.py)",
                         check=check_recipe_path)
    teachers_root: str = option("teachers", "where the recipe's teachers <name>_f<fold> (or <name>_all) are written "
                                "(and reused from)",
                                path="out_dir")
    seed: int = option(0, "seed of the split, teachers, student and views", min=0)
    out: str = option("model.pth", "the student's state_dict (replaced only by a finished run)", path="out_file")
    work_dir: str = option("runs/pipeline", "distillation work folder, stages.json, timings.json, the resolved "
                           "config.yaml and recipe.yaml", path="out_dir")
    report_dir: str = option("reports/pipeline", "evaluation report folder", path="out_dir")
    heldout_fold: int = option(-1, "nested estimate: no teacher and no student trains on this fold, the "
                               "student's val fold (-1: none; the shipped student trains on every image)", min=-1)
    hard_label_control: bool = option(False, "also train the same student on hard labels only (distill.py "
                                      "--hard-labels), into work_dir/scratch: the control distillation must beat")
    student_seeds: list[int] = option([], "more seeds of the student (and its control) on the same teachers and "
                                      "split, into work_dir/seed<S>; with --heldout-fold and --hard-label-control the "
                                      "run ends with the paired table (work_dir/heldout_pairs.csv)", min=0)
    reuse_teachers: bool = option(True, "keep the recipe's teachers that already exist under teachers_root")
    report: bool = option(True, "write the evaluation report at the end")

    def check(self):
        """The recipe's teachers and student pass their scripts' checks, before any teacher trains
        (a bad value raises their ConfigError, which names the recipe file and key)."""
        recipe = load_recipe(self.recipe)
        if self.heldout_fold >= recipe.n_folds:
            return "heldout_fold", (f"fold {self.heldout_fold} does not exist in the recipe's {recipe.n_folds}-fold "
                                    "split")
        for name, _ in recipe.members():
            parse_config(train_teacher.TeacherConfig, teacher_argv(self, name, 0))
        for scratch in (False, True) if self.hard_label_control else (False,):
            parse_config(distill.DistillConfig, student_argv(self, Path(self.work_dir), scratch))
        return None


def teacher_argv(cfg: PipelineConfig, name: str, fold: int) -> list[str]:
    """All the pipeline tells train_teacher.py: paths, the recipe and its member, the fold (-1: every
    image), the seed."""
    nested = ["--exclude-folds", str(cfg.heldout_fold)] if cfg.heldout_fold >= 0 else []
    return ["--data", cfg.data, *(["--recipe", cfg.recipe] if cfg.recipe else []), "--member", name,
            "--fold", str(fold), "--seed", str(cfg.seed), "--out", str(teacher_folder(cfg, name, fold)), *nested]


def teacher_folder(cfg: PipelineConfig, name: str, fold: int) -> Path:
    """teachers_root/<name>_f<fold>, or <name>_all for the teacher of every image (fold -1)."""
    return Path(cfg.teachers_root) / (name + fold_suffix(fold))


def recipe_teachers(cfg: PipelineConfig) -> list[Path]:
    """The teacher folders of this run's recipe, in its order: the student's ensemble is these,
    not whatever else lies under teachers_root (another recipe's teachers are never mixed in)."""
    recipe = load_recipe(cfg.recipe)
    return [teacher_folder(cfg, name, fold) for name, _ in recipe.members()
            for fold in recipe.teacher_folds(cfg.heldout_fold)]


def student_argv(cfg: PipelineConfig, work: Path, scratch: bool = False, seed: int | None = None) -> list[str]:
    """All the pipeline tells distill.py: paths, the recipe, the held-out fold, the seed. Another
    student ``seed`` than the pipeline's trains in work/seed<S> on the same split (--split-seed) and
    the same views, those the teachers' trunks cached (--view-seed)."""
    seed = cfg.seed if seed is None else seed
    if seed != cfg.seed:
        work = work / f"seed{seed}"
    out = work / "scratch" / "model.pth" if scratch else Path(cfg.out) if seed == cfg.seed else work / "model.pth"
    return ["--data", cfg.data, *(["--recipe", cfg.recipe] if cfg.recipe else []),
            "--teachers", *map(str, recipe_teachers(cfg)), "--val-fold", str(cfg.heldout_fold), "--seed", str(seed),
            *(["--split-seed", str(cfg.seed)] if seed != cfg.seed else []),
            "--view-seed", str(cfg.seed), "--out", str(out),
            "--work-dir", str(work / ("scratch" if scratch else "distill")), *(["--hard-labels"] if scratch else [])]


def main(argv=None) -> dict:
    cfg = parse_config(PipelineConfig, argv)
    setup_logging()
    work = Path(cfg.work_dir)
    with hold_locks(folders=[work, cfg.teachers_root, cfg.report_dir], files=[cfg.out]):
        return run(cfg, work)


def run(cfg: PipelineConfig, work: Path) -> dict:
    recipe = load_recipe(cfg.recipe)
    timings: dict[str, float] = {}
    statuses: dict[str, str] = {}

    def stage(name, status, fn):
        print(f"\n=== {name}: {status}", flush=True)
        t0 = time.time()
        result = fn()
        timings[name], statuses[name] = round(time.time() - t0, 1), status
        print(f"=== {name}: {status}, {timings[name]:.0f} s", flush=True)
        return result

    data = stage("decode data", "decoded or read from the cache", lambda: load_course_folder(cfg.data))
    for name, _ in recipe.members():
        for fold in recipe.teacher_folds(cfg.heldout_fold):
            argv = teacher_argv(cfg, name, fold)
            folder = Path(argv[argv.index("--out") + 1])
            status = teacher_status(cfg, folder, argv, data.fingerprint)
            stage_name = f"teacher {name} fold {fold}" if fold >= 0 else f"teacher {name} all images"
            if status.startswith("reused"):
                print(f"=== {stage_name}: {status}", flush=True)
                statuses[stage_name] = status
                continue
            stage(stage_name, status,
                  lambda: train_teacher.main(argv + (["--resume"] if status.startswith("resumed") else [])))

    teachers_sha = teachers_digest(recipe_teachers(cfg))
    record_path = work / "stages.json"
    seeds = [cfg.seed] + [s for s in dict.fromkeys(cfg.student_seeds) if s != cfg.seed]
    pairs = []  # (seed, distilled student's out, control's out)
    for seed in seeds:
        outs = []
        for scratch in [False] + ([True] if cfg.hard_label_control else []):
            argv = student_argv(cfg, work, scratch, seed)
            name = "hard-label control" if scratch else "distil student"
            name += f" seed {seed}" if seed != cfg.seed else ""
            status = student_status(argv, record_path, teachers_sha, scratch, name)
            outs.append(Path(argv[argv.index("--out") + 1]))
            if status.startswith("reused"):
                print(f"=== {name}: {status}", flush=True)
                statuses[name] = status
                continue
            record_stage(record_path, name, {"teachers": teachers_sha, "finished": None})
            stage(name, status, lambda: distill.main(argv + (["--resume"] if status.startswith("resumed") else [])))
            record_stage(record_path, name, {"teachers": teachers_sha, "finished": file_digest(outs[-1])})
        if cfg.hard_label_control:
            pairs.append((seed, *outs))
    if cfg.heldout_fold >= 0 and pairs:
        paired_table(cfg.heldout_fold, pairs, work / "heldout_pairs.csv")

    if cfg.report:
        from toolkit import evaluate
        from toolkit.estimates import find_heldout
        # The report leads with what no model trained on: fold teachers' and their ensemble's
        # out-of-fold accuracies (teachers of every image have none) and any nested held-out
        # student estimate found under runs/; the shipped student trained on every image, so its
        # own scores there are in-sample.
        teacher_dirs = [str(p) for p in recipe_teachers(cfg)]
        heldout = [str(p) for p in find_heldout("runs")]
        arch = parse_config(distill.DistillConfig, student_argv(cfg, work)).arch  # the recipe's student
        stage("evaluation report", "written anew (a few minutes; not resumable)", lambda: evaluate.main([
            "report", "--data", cfg.data, "--arch", arch, "--weights", cfg.out, "--out", cfg.report_dir,
            "--teachers", *teacher_dirs, *(["--heldout", *heldout] if heldout else [])]))

    timings["total"] = round(sum(timings.values()), 1)
    atomic_write_json({"config": asdict(cfg), "seconds": timings, "status": statuses}, work / "timings.json")
    atomic_write_text(yaml.safe_dump(asdict(cfg), sort_keys=False), work / "config.yaml")  # replays with --config
    atomic_write_text(yaml.safe_dump(recipe.as_yaml_dict(), sort_keys=False), work / "recipe.yaml")  # --recipe
    print(f"\n{'stage':<34} {'seconds':>7}  what happened")
    for name, status in statuses.items():
        print(f"{name:<34} {timings.get(name, 0):>7.0f}  {status}")
    print(f"{'total':<34} {timings['total']:>7.0f}")
    return timings


# ----------------------------------------------------------------------------------------
# What each stage can reuse or resume
# ----------------------------------------------------------------------------------------
def teacher_status(cfg: PipelineConfig, folder: Path, argv: list[str], fingerprint: str) -> str:
    """'reused ...' (a finished teacher of this very recipe, fold and data), 'resumed ...' (a
    checkpoint of an unfinished one) or 'trained'. A finished teacher of another recipe or data
    in the way is refused (DataError): the pipeline never mixes recipes silently."""
    if cfg.reuse_teachers and (folder / TEACHER_FILE).is_file():
        problem = teacher_mismatch(folder, argv, fingerprint)
        if problem:
            raise DataError(f"{folder}: a finished teacher of another run is in the way ({problem}); move it "
                            "away, or use another --teachers-root")
        stray = folder / CHECKPOINT
        if stray.is_file():  # killed between writing teacher.pth and removing its checkpoint
            stray.unlink()
        return "reused (finished earlier)"
    checkpoint = folder / CHECKPOINT
    if checkpoint.is_file():
        return f"resumed from its checkpoint ({checkpoint_position(checkpoint)})"
    return "trained"


def teacher_mismatch(folder: Path, argv: list[str], fingerprint: str) -> str | None:
    """How a finished teacher's recorded config differs from what ``argv`` would train, or None."""
    try:
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert isinstance(saved, dict)
    except (OSError, yaml.YAMLError, AssertionError):
        return "its config.yaml is missing or unreadable"
    if saved.get("data_fingerprint", fingerprint) != fingerprint:
        return "trained on other data"
    wanted = compared_config(asdict(parse_config(train_teacher.TeacherConfig, argv)))
    changed = sorted(k for k in wanted if k in saved and saved[k] != wanted[k])
    if changed:
        k = changed[0]
        more = f", and {len(changed) - 1} more" if len(changed) > 1 else ""
        return f"{k} was {saved[k]!r}, this recipe says {wanted[k]!r}{more}"
    return None


def student_status(argv: list[str], record_path: Path, teachers_sha: str, scratch: bool, name: str) -> str:
    """'reused ...' (its model.pth is the one this run's student stage ``name`` finished with, from
    these very teachers), 'resumed ...' (a checkpoint of the same student from the same teachers)
    or 'trained'."""
    record = read_records(record_path).get(name, {})
    out = Path(argv[argv.index("--out") + 1])
    same_teachers = scratch or record.get("teachers") == teachers_sha
    if same_teachers and record.get("finished") and out.is_file() and record["finished"] == file_digest(out):
        return "reused (finished earlier)"
    checkpoint = Path(argv[argv.index("--work-dir") + 1]) / CHECKPOINT
    if checkpoint.is_file():
        if same_teachers and record:
            return f"resumed from its checkpoint ({checkpoint_position(checkpoint)})"
        checkpoint.unlink()  # the teachers changed since: its soft targets are not this run's
        return "trained (the checkpoint there came from other teachers: removed)"
    return "trained"


def paired_table(fold: int, pairs: list[tuple[int, Path, Path]], csv_path: Path) -> list[dict]:
    """The nested estimate's paired comparison: per seed, the distilled student's and its
    hard-label control's accuracy on the held-out fold (percent), printed with the mean gap and
    its standard error, and written to ``csv_path`` (fold,seed,distilled,hard_label)."""
    from toolkit.estimates import format_pairs, read_pair, write_pairs_csv
    rows = [read_pair(distilled.with_suffix(".provenance.json"), control.with_suffix(".provenance.json"))
            for _, distilled, control in pairs]
    print("\n" + format_pairs(rows, f"held-out fold {fold}: distilled vs hard-label control, paired by seed"))
    write_pairs_csv(rows, csv_path)
    return rows


def checkpoint_position(path: Path) -> str:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return f"epoch {state['epoch'] + 1}, step {state['global_step']}"
    except Exception as err:  # the script itself will refuse it with a clear line
        return f"unreadable: {type(err).__name__}"


def file_digest(path: Path) -> str | None:
    return hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else None


def teachers_digest(folders: list[Path]) -> str:
    """One hash of the recipe's teacher.pth files: the student's soft targets depend on them."""
    h = hashlib.sha1()
    for folder in folders:
        h.update(f"{folder.name}:{file_digest(folder / TEACHER_FILE)}".encode())
    return h.hexdigest()


def read_records(path: Path) -> dict:
    import json
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def record_stage(path: Path, name: str, record: dict) -> None:
    atomic_write_json(read_records(path) | {name: record}, path)


def cli() -> None:
    """The console script ``toolkit-pipeline`` (pyproject.toml)."""
    run_main(main, resume_hint="run the same command again: it continues where it stopped")


if __name__ == "__main__":
    cli()
