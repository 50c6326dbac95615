"""One error handler for every entry point (train_teacher.py, distill.py, pipeline.py,
python -m toolkit.evaluate): an expected failure ends the command with one line
``error: <culprit>: <what is wrong>`` and exit code 2 (a bad flag or config value) or 1
(anything found while running: data, teachers, architecture, checkpoints, outputs, a
diverging loss); Ctrl-C ends it with one line saying how to resume. A traceback is left for
genuine bugs only.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Callable

from .config import ConfigError
from .data import DataError  # TeacherError and ContractError are DataErrors too

EXIT_INTERRUPTED = 130


def expected_errors() -> tuple[type[BaseException], ...]:
    from .engine import CheckpointError, NonFiniteLossError, TrainingError
    return (DataError, CheckpointError, NonFiniteLossError, TrainingError, OSError)


def one_line(err: BaseException) -> str:
    """The error as one line; an OSError names its file (``path: strerror``)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror.lower()}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def run_main(main: Callable, argv: list[str] | None = None, resume_hint: str = "--resume",
             prog: str | None = None) -> None:
    """Run ``main(argv)`` as the command ``prog``; ends in SystemExit when something went wrong.

    ``resume_hint``: a flag to add to the command line to continue after Ctrl-C, or a
    sentence saying how to continue."""
    from .runlog import setup_logging
    setup_logging()  # the library's progress lines (per-epoch rows, cache notes) on stdout
    try:
        main(argv)
        from .distributed import finish_distributed
        finish_distributed()
    except ConfigError as err:
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"\ninterrupted: {_resume_text(argv, resume_hint, prog)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except expected_errors() as err:
        raise SystemExit(f"error: {one_line(err)}") from None


def _resume_text(argv: list[str] | None, hint: str, prog: str | None) -> str:
    if not hint.startswith("--"):
        return hint
    args = list(sys.argv[1:] if argv is None else argv)
    prog = prog or Path(sys.argv[0]).name
    if hint not in args:
        args.append(hint)
    command = f"python {prog}" if prog.endswith(".py") else prog  # a script, or a console script
    return f"continue from the last checkpoint with: {command} {shlex.join(args)}"
