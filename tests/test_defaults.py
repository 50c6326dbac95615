"""One default per field: the literal written where a field is declared is the default that
``--help`` shows, that the dataclass and the command line run, and that ``./run.sh`` uses; no
import cycle among the project's modules."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest

import distill
import pipeline
import train_teacher
from helpers_distill import ROOT
from toolkit import evaluate
from toolkit.config import parse_config

EVALUATE = [cls for cls, _ in evaluate.COMMANDS.values()]
CONFIGS = [distill.DistillConfig, train_teacher.TeacherConfig, pipeline.PipelineConfig, *EVALUATE]
MISSING = object()


def source_literals(cls) -> dict[str, object]:
    """{field: the literal default written at its declaration}, the most derived declaration
    winning; ``option(VALUE, ...)``, ``run_field(NAME, VALUE)`` or ``= VALUE``. A declaration
    without a default (``option(dataclasses.MISSING, ...)``) gives MISSING."""
    found: dict[str, object] = {}
    for klass in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef)).body
        for node in body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value):
                continue
            value = node.value
            if isinstance(value, ast.Call):
                name = getattr(value.func, "id", getattr(value.func, "attr", ""))
                value = value.args[1] if name == "run_field" else value.args[0]
            if ast.unparse(value) in ("dataclasses.MISSING", "REQUIRED"):
                found[node.target.id] = MISSING
            else:
                found[node.target.id] = ast.literal_eval(value)
    return found


def help_defaults(cls, capsys) -> dict[str, str]:
    """{flag: the text of its '(default: ...)'} from ``--help``."""
    with pytest.raises(SystemExit):
        parse_config(cls, ["--help"])
    out = capsys.readouterr().out.split("options:", 1)[1]
    entries = [" ".join(e.split()) for e in re.split(r"\n(?=  -)", out)]
    found = {}
    for entry in filter(None, entries):
        flag = entry.split()[0].rstrip(",")
        match = re.search(r".*\(default: (.*)\)$", entry)  # the last one: argparse's
        if match:
            found[flag] = match.group(1)
    return found


def required_argv(cls) -> list[str]:
    """Values for a command's required flags (an evaluate command's --data, --out, RUN ...)."""
    argv = []
    for field in dataclasses.fields(cls):
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            value = str(ROOT) if field.name in ("data", "runs") else str(ROOT / "tests" / "no_such_output")
            argv += [value] if field.metadata.get("positional") else ["--" + field.name.replace("_", "-"), value]
    return argv


@pytest.mark.parametrize("cls", CONFIGS, ids=[c.__name__ for c in CONFIGS])
def test_literal_default_in_the_source_is_the_help_default(cls, capsys):
    literals = source_literals(cls)
    shown = help_defaults(cls, capsys)
    given = required_argv(cls)
    parsed = parse_config(cls, given)
    built = cls(**{f.name: getattr(parsed, f.name) for f in dataclasses.fields(cls) if literals.get(f.name) is MISSING})
    for field in dataclasses.fields(cls):
        literal = literals.get(field.name, MISSING)
        flag = "--" + field.name.replace("_", "-")
        if literal is MISSING and cls in EVALUATE:  # a flag to give: its help says so, and shows no default
            assert field.metadata.get("positional") or flag not in shown, flag
            continue
        assert literal is not MISSING, f"{cls.__name__}.{field.name}: no literal default where it is declared"
        assert shown[flag] == " ".join(str(literal).split()), (flag, shown[flag], literal)
        assert getattr(parsed, field.name) == getattr(built, field.name), field.name
        if field.name != "out" or literal:  # a teacher's empty --out names its folder after its recipe
            assert getattr(built, field.name) == literal, (field.name, getattr(built, field.name), literal)


def test_run_sh_trains_the_field_defaults():
    """./run.sh is ``pipeline.py --data DIR``: it tells each script paths, the teacher's name in the
    recipe, its fold and the seed, nothing else; so what trains is the scripts' field defaults."""
    cfg = parse_config(pipeline.PipelineConfig, [])
    recipe = pipeline.load_recipe(cfg.recipe)
    paths = {"data", "out", "work_dir", "teachers", "member"}
    for name, _ in recipe.members():
        for fold in recipe.teacher_folds():
            teacher = asdict(parse_config(train_teacher.TeacherConfig, pipeline.teacher_argv(cfg, name, fold)))
            default = asdict(train_teacher.TeacherConfig())
            changed = {k for k in default if k not in paths and teacher[k] != default[k]}
            assert changed <= {"model", "input_size"}, changed  # the member's own (MODEL@SIZE in the recipe)
    student = asdict(parse_config(distill.DistillConfig, pipeline.student_argv(cfg, Path(cfg.work_dir))))
    default = asdict(distill.DistillConfig())
    assert {k for k in default if k not in paths and student[k] != default[k]} == set()
    run_sh = (ROOT / "run.sh").read_text()
    assert re.search(r'^exec python pipeline\.py --data "\$DATA_DIR" "\$@"$', run_sh, re.M)


def project_modules() -> dict[str, Path]:
    modules = {p.stem: p for p in ROOT.glob("*.py")}
    modules.update({f"toolkit.{p.stem}": p for p in (ROOT / "toolkit").glob("*.py") if p.stem != "__init__"})
    modules["toolkit"] = ROOT / "toolkit" / "__init__.py"
    return modules


def imports_of(name: str, path: Path, modules: dict) -> set[str]:
    """Every project module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from . import x: inside toolkit
                base = "toolkit" + (f".{node.module}" if node.module else "")
                found |= {f"{base}.{a.name}" for a in node.names} | {base}
            elif node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle_among_the_projects_modules():
    modules = project_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    graph["toolkit"] = set()  # the package re-exports its modules; they never need it

    def cycle_from(start, node, seen):
        for nxt in graph[node]:
            if nxt == start:
                return [node, nxt]
            if nxt not in seen:
                seen.add(nxt)
                rest = cycle_from(start, nxt, seen)
                if rest:
                    return [node, *rest]
        return None

    for name in graph:
        cycle = cycle_from(name, name, {name})
        assert cycle is None, " -> ".join(cycle)
