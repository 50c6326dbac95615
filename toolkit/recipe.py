"""The recipe: what ``./run.sh`` trains, and the way to name an alternative.

The default recipe is the scripts' own field defaults (``TeacherConfig``, ``DistillConfig``: the
value written at each field is the one that runs) plus what no single script holds: the list of
teachers and how they split the data (``Recipe()``). ``python train_teacher.py`` trains the
recipe's first teacher, ``python distill.py`` distils its student, and ``pipeline.py`` passes them
nothing but paths, the fold, the member and the seed. A recipe file (YAML, ``--recipe FILE``)
names an alternative: it lists only what differs, in its sections::

    folds: 5                      # both scripts' --folds (the teachers' split and the student's)
    views: 2                      # both scripts' --views (cached views per image)
    teachers:                     # one entry per teacher recipe: MODEL@SIZE[:flag=value,...]
      - efficientnet_lite0@224
      - efficientnet_lite2@260:epochs=8
    teacher: {epochs: 8}          # train_teacher.py fields, as in its config.yaml
    student: {view_kind: shift}   # distill.py fields, as in its config.yaml
    teacher_split: folds          # folds: k fold teachers per recipe; all: one on every image

With ``teacher_split: folds`` each teacher recipe is trained as ``folds`` fold teachers
``<name>_f<fold>`` (name: ``lite2_260px`` for ``efficientnet_lite2@260``), each labelling the fold
it never saw (out-of-fold targets). With ``teacher_split: all`` (the default) it is one teacher
``<name>_all`` trained on every image the run may use (all but a nested estimate's held-out
fold), whose targets on the student's images are in-sample. The ensemble is all of the recipe's
teachers. Why the default recipe is what it is, with the evidence: docs/results.md.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, ConfigParser, TrainingRun, coerce, load_yaml_mapping

DEFAULT_TEACHERS = ("efficientnet_lite0@224", "efficientnet_lite2@224")
SECTIONS = ("folds", "views", "teachers", "teacher", "student", "teacher_split")
TEACHER_SPLITS = ("folds", "all")
SHARED = ("folds", "views")  # top-level keys that go to both scripts


class RecipeError(ConfigError):
    """A recipe file or teacher entry that cannot be used; one line naming file and key (a
    ConfigError: refused before any work, exit code 2)."""


@dataclass
class Recipe:
    """A recipe; ``Recipe()`` is the default one. ``folds`` / ``views`` None and empty sections:
    the scripts' own field defaults."""
    teachers: list[str] = field(default_factory=lambda: list(DEFAULT_TEACHERS))
    teacher_split: str = "all"
    folds: int | None = None
    views: int | None = None
    teacher: dict = field(default_factory=dict)
    student: dict = field(default_factory=dict)
    source: str = "the default recipe"

    @property
    def n_folds(self) -> int:
        """k of the split both scripts use: the file's ``folds``, else the field default."""
        if self.folds is not None:
            return self.folds
        return next(f.default for f in dataclasses.fields(TrainingRun) if f.name == "folds")

    def members(self) -> list[tuple[str, dict]]:
        """[(folder name, {train_teacher field: value string})] in the recipe's order."""
        return [parse_member(entry) for entry in self.teachers]

    def member(self, name: str) -> dict:
        """The flags of the member called ``name`` ('' = the first)."""
        members = self.members()
        if not name:
            return members[0][1]
        for member_name, flags in members:
            if member_name == name:
                return flags
        raise RecipeError(f"--member: {name!r} is not a teacher of {self.source} "
                          f"(its teachers: {', '.join(n for n, _ in members)})")

    def teacher_folds(self, heldout_fold: int = -1) -> list[int]:
        """The ``--fold`` of each teacher of one recipe: every fold but the held-out one
        (``teacher_split: folds``), or [-1], one teacher on every image (``all``)."""
        if self.teacher_split == "all":
            return [-1]
        return [f for f in range(self.n_folds) if f != heldout_fold]

    def section(self, which: str) -> dict:
        """Field defaults for one script ('teacher' or 'student'): its section + the shared keys;
        for the teacher, the fold its split trains first: -1 (``<name>_all``) under ``teacher_split:
        all``, else 0, so that ``python train_teacher.py`` trains a teacher the recipe uses."""
        split = {"fold": -1 if self.teacher_split == "all" else 0} if which == "teacher" else {}
        shared = {k: getattr(self, k) for k in SHARED if getattr(self, k) is not None}
        return {**shared, **split, **getattr(self, which)}

    def as_yaml_dict(self) -> dict:
        """The recipe as a file that replays it (``--recipe``)."""
        return {k: copy.deepcopy(getattr(self, k)) for k in SECTIONS if getattr(self, k) is not None}


def parse_member(entry: str) -> tuple[str, dict]:
    """'efficientnet_lite2@260:epochs=8,frozen_stages=5' -> ('lite2_260px', {'model': ...,
    'input_size': '260', 'epochs': '8', 'frozen_stages': '5'}) (values are coerced by the caller)."""
    head, _, extra = str(entry).partition(":")
    model, _, size = head.partition("@")
    if not model or not size.isdigit():
        raise RecipeError(f"teachers: {entry!r}: expected MODEL@SIZE[:flag=value,...]")
    flags = {"model": model, "input_size": size}
    for item in filter(None, extra.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise RecipeError(f"teachers: {entry!r}: {item!r} is not flag=value")
        flags[key.strip().replace("-", "_")] = value.strip()
    return teacher_folder_name(model, size), flags


def teacher_folder_name(model: str, input_size: int | str, fold: int | None = None) -> str:
    """'efficientnet_lite2', 224, 1 -> 'lite2_224px_f1' (fold None: without the fold; -1: '_all')."""
    name = f"{model.replace('efficientnet_', '')}_{input_size}px"
    return name if fold is None else name + fold_suffix(fold)


def fold_suffix(fold: int) -> str:
    """A teacher folder's suffix: '_f<fold>', or '_all' for the teacher of every image (fold -1)."""
    return f"_f{fold}" if fold >= 0 else "_all"


@functools.lru_cache(maxsize=8)
def _read_file(path: str, mtime_ns: int) -> dict:
    return load_yaml_mapping(Path(path), "recipe file", f"a mapping of {', '.join(SECTIONS)}", RecipeError)


def load_recipe(path: str | Path | None = None) -> Recipe:
    """``Recipe()``, with what a recipe file at ``path`` changes (None or '': unchanged).
    RecipeError naming the file and key for an unknown section or a value of the wrong form
    (the field values themselves are checked by the script that reads them). A top-level shared
    key (``folds``, ``views``) goes to both scripts, unless a section of the file sets its own."""
    values = {"teacher": {}, "student": {}}
    source = "the default recipe"
    if path:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"--recipe: {p}: recipe file not found" + (" (it is a folder)" if p.is_dir() else ""))
        raw = copy.deepcopy(_read_file(str(p), p.stat().st_mtime_ns))
        unknown = sorted(set(map(str, raw)) - set(SECTIONS))
        if unknown:
            raise RecipeError(f"{p}: unknown keys {unknown} (a recipe has {', '.join(SECTIONS)})")
        for key in ("teacher", "student"):
            if key in raw and not isinstance(raw[key], dict):
                raise RecipeError(f"{p}: {key}: expected a mapping of field: value")
            values[key].update(raw.pop(key, None) or {})
        if "teachers" in raw and (not isinstance(raw["teachers"], list) or not raw["teachers"]):
            raise RecipeError(f"{p}: teachers: expected a non-empty list of MODEL@SIZE[:flag=value,...]")
        for key in SHARED:
            if key in raw and (isinstance(raw[key], bool) or not isinstance(raw[key], int)):
                raise RecipeError(f"{p}: {key}: expected an integer, got {raw[key]!r}")
        if "teacher_split" in raw and raw["teacher_split"] not in TEACHER_SPLITS:
            raise RecipeError(f"{p}: teacher_split: expected one of {', '.join(TEACHER_SPLITS)}, "
                              f"got {raw['teacher_split']!r}")
        values.update(raw)
        source = str(p)
    recipe = Recipe(**values, source=source)
    try:
        recipe.members()
    except RecipeError as err:
        raise RecipeError(f"{source}: {err}") from None
    return recipe


def recipe_field_defaults(cls, recipe: Recipe, which: str, member: str = "") -> dict[str, object]:
    """The defaults ``cls`` (a script's config) takes from ``recipe``: section ``which`` and, for
    the teacher, the flags of ``member``; values coerced to the field types. RecipeError naming
    the recipe and key for a key the config does not have or a value of the wrong type."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, object] = {}
    items = list(recipe.section(which).items())
    origin = {k: f"{which}.{k}" if k not in SHARED else k for k, _ in items}
    if which == "teacher":
        flags = recipe.member(member)
        items += list(flags.items())
        origin.update({k: f"teachers: {member or 'first'}: {k}" for k in flags})
    for key, value in items:
        if key not in names:
            raise RecipeError(f"{recipe.source}: {origin[key]}: {cls.__name__} has no field {key!r}")
        kind = hints[key]
        try:
            text = isinstance(value, str) and kind is not str  # a member's 'flag=value' text
            values[key] = coerce_text(value, kind) if text else coerce(value, kind)
        except ValueError as err:
            raise RecipeError(f"{recipe.source}: {origin[key]}: {err}") from None
    return values


def coerce_text(text: str, kind):
    """A recipe entry's 'flag=value' text -> ``kind`` (int, float, bool; lists: comma-separated)."""
    if typing.get_origin(kind) in (list, tuple):
        return [coerce_text(t, typing.get_args(kind)[0]) for t in filter(None, text.split(","))]
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "yes", "1"):
            return True
        if lowered in ("false", "no", "0"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    return coerce(text, kind)


def recipe_section(which: str):
    """A script config's ``argv_defaults`` (read by ``parse_config``): the defaults the recipe file
    ``--recipe FILE`` gives section ``which`` ('teacher' or 'student'), and for the teacher the
    flags of the teacher ``--member NAME``; with no file, the default recipe's (the fields' own
    defaults, and the first teacher's model and size, which the teacher's fields show)."""
    def argv_defaults(cls, argv: list[str]) -> tuple[str, dict]:
        pre = ConfigParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--recipe", default="")
        pre.add_argument("--member", default="")
        known, _ = pre.parse_known_args(argv)
        recipe = load_recipe(known.recipe)
        return recipe.source, recipe_field_defaults(cls, recipe, which, known.member)
    return classmethod(argv_defaults)
