"""The recipe: the one definition of what ``./run.sh`` trains, read by all three scripts.

``train_teacher.py``, ``distill.py`` and ``pipeline.py`` take their defaults from it (through
``parse_config``): ``python train_teacher.py`` trains the recipe's first teacher,
``python distill.py`` distils the recipe's student, and the pipeline passes them nothing but
paths, the fold, the member and the seed. A recipe file (YAML, ``--recipe FILE``) names an
alternative: it lists only what differs from ``DEFAULT_RECIPE``, in its sections::

    folds: 3                      # shared by the teachers' split and the student's
    views: 2                      # cached views per image, teachers and student alike (a section may
                                  # set its own: the default student has 6)
    teachers:                     # one entry per teacher recipe: MODEL@SIZE[:flag=value,...]
      - efficientnet_lite0@224
      - efficientnet_lite2@260:epochs=8
    teacher: {pretrained: offline, epochs: 6}   # train_teacher.py fields, as in its config.yaml
    student: {epochs: 10}                       # distill.py fields, as in its config.yaml
    teacher_split: folds          # folds: k fold teachers per recipe; all: one on every image

With ``teacher_split: folds`` each teacher recipe is trained as ``folds`` fold teachers
``<name>_f<fold>`` (name: ``lite2_260px`` for ``efficientnet_lite2@260``), each labelling the fold
it never saw (out-of-fold targets). With ``teacher_split: all`` it is one teacher ``<name>_all``
trained on every image the run may use (all but a nested estimate's held-out fold), whose
targets on the student's images are in-sample (one head per recipe to train instead of k).
The ensemble is all of the recipe's teachers.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError

# Why these values (measured on this 2-core CPU; docs/results.md):
#  * teachers larger and sharper than the student: EfficientNet-Lite0 and -Lite2 from offline
#    ImageNet weights at 224 px RGB (resolution was the lever: lite0 160 -> 224 px is +3.9
#    points; Lite2 adds a point and diversity), stem + 5 stages frozen and their features
#    computed once for `views` views (the plain image and its mirror);
#  * one teacher per recipe on every image (teacher_split: all): its targets on the student's
#    images are in-sample (with mixed views that still won every nested pair below), and it
#    trains one head per recipe instead of 3 fold heads, which pays for the longer schedule;
#  * patient and consistent distillation (issue 21; Beyer et al. 2022): besides the plain image
#    and its mirror, 4 random resized crops per image, each mixed with another image by CutMix
#    or mixup and labelled once by the ensemble on exactly that mix; KD T = 1, alpha = 0.5;
#    20 epochs (at 10 the distilled and hard-label students are close; both flatten after
#    epoch 12-13). On 6 nested pairs (folds 0 and 1 of 3, seeds 0-2) it beat the same recipe
#    on hard labels every time, by +0.95 points (SE 0.27), at 88.8 % (docs/heldout_pairs.csv);
#  * the shipped student trains on every image (val_fold -1).
# recipes/fold_teachers.yaml is the recipe shipped before it (3 out-of-fold teachers per
# recipe, 2 flip/shift views, 10 epochs).
DEFAULT_RECIPE = {
    "folds": 3,
    "views": 2,
    "teachers": ["efficientnet_lite0@224", "efficientnet_lite2@224"],
    "teacher": {"pretrained": "offline", "epochs": 6, "batch_size": 64, "warmup_epochs": 0.5, "ema_decay": 0.998,
                "frozen_stages": 5, "input_mode": "rgb"},
    "student": {"view_kind": "mixed", "views": 6, "epochs": 20, "val_fold": -1},
    "teacher_split": "all",
}
SECTIONS = ("folds", "views", "teachers", "teacher", "student", "teacher_split")
TEACHER_SPLITS = ("folds", "all")
SHARED = ("folds", "views")  # top-level keys that go to both scripts


class RecipeError(ConfigError):
    """A recipe file or teacher entry that cannot be used; one line naming file and key (a
    ConfigError: refused before any work, exit code 2)."""


@dataclass
class Recipe:
    folds: int
    views: int
    teachers: list[str]
    teacher: dict = field(default_factory=dict)
    student: dict = field(default_factory=dict)
    teacher_split: str = "folds"
    source: str = "the default recipe"

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
        return [f for f in range(self.folds) if f != heldout_fold]

    def section(self, which: str) -> dict:
        """Field defaults for one script ('teacher' or 'student'): its section + the shared keys;
        for the teacher, the fold its split trains first: -1 (``<name>_all``) under ``teacher_split:
        all``, else 0, so that ``python train_teacher.py`` trains a teacher the recipe uses."""
        split = {"fold": -1 if self.teacher_split == "all" else 0} if which == "teacher" else {}
        return {**{k: getattr(self, k) for k in SHARED}, **split, **getattr(self, which)}

    def as_yaml_dict(self) -> dict:
        return {k: copy.deepcopy(getattr(self, k)) for k in SECTIONS}


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
    from .config import load_yaml_mapping
    return load_yaml_mapping(Path(path), "recipe file", f"a mapping of {', '.join(SECTIONS)}", RecipeError)


def load_recipe(path: str | Path | None = None) -> Recipe:
    """``DEFAULT_RECIPE``, with what a recipe file at ``path`` changes (None or '': unchanged).
    RecipeError naming the file and key for an unknown section or a value of the wrong form
    (the field values themselves are checked by the script that reads them). A top-level shared
    key of the file (``folds``, ``views``) replaces that key in the default's sections too."""
    values = copy.deepcopy(DEFAULT_RECIPE)
    source = "the default recipe"
    if path:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"--recipe: {p}: recipe file not found" + (" (it is a folder)" if p.is_dir() else ""))
        raw = copy.deepcopy(_read_file(str(p), p.stat().st_mtime_ns))
        unknown = sorted(set(map(str, raw)) - set(SECTIONS))
        if unknown:
            raise RecipeError(f"{p}: unknown keys {unknown} (a recipe has {', '.join(SECTIONS)})")
        for key in SHARED:  # a file's top-level `views: 3` means both scripts, whatever the default's sections say
            if key in raw:
                for section in ("teacher", "student"):
                    values[section].pop(key, None)
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
    from .config import coerce

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
    from .config import coerce
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


def with_recipe_defaults(cls):
    """Class decorator for a script's config (``cls.RECIPE_SECTION``: 'teacher' or 'student'):
    its dataclass defaults become the default recipe's values, so ``TeacherConfig()``, the
    command line's defaults and ``./run.sh`` all train the same recipe (``parse_config`` applies
    a ``--recipe`` file or ``--member`` on top)."""
    from .config import with_defaults
    return with_defaults(cls, **recipe_field_defaults(cls, load_recipe(), cls.RECIPE_SECTION))
