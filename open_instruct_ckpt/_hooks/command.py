"""An `on_published` hook as given: a command template or a callable, checked when it is built.

A command is a list of arguments, or a string split into arguments as a shell would split it
(`shlex.split`); no shell runs it. In every argument `{path}`, `{step}`, `{name}` and `{url}` are
replaced by the checkpoint's values, so a path with spaces stays one argument. The same values are
in the environment (`OPEN_INSTRUCT_CKPT_PATH`, `_STEP`, `_NAME`, `_URL`) for a command that needs a
shell: `["sh", "-c", 'lm_eval ... --model_args pretrained="$OPEN_INSTRUCT_CKPT_PATH" > eval.log']`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIELDS = ("path", "step", "name", "url")
_SAMPLE = {"path": "/out/step_1", "step": 1, "name": "step_1", "url": "/out/step_1"}


@dataclass(frozen=True)
class Published:
    """What a hook is told about a checkpoint: `path` on this machine; `url` its uploaded copy (else the path)."""

    name: str
    step: int
    path: Path
    url: str

    def values(self) -> dict[str, Any]:
        return {"path": str(self.path), "step": self.step, "name": self.name, "url": self.url}


def arguments(run: Any, owner: str = "Hook(run=...)") -> list[str] | None:
    """The command's argument templates, checked; None for a callable. Raises TypeError/ValueError naming the fix."""
    if callable(run) and not isinstance(run, (str, bytes)):
        return None
    if isinstance(run, str):
        try:
            argv = shlex.split(run)
        except ValueError as exc:
            raise ValueError(f"{owner}: {run!r} cannot be split into arguments ({exc}); check its quotes") from None
    elif isinstance(run, Sequence) and not isinstance(run, bytes) and all(isinstance(a, str) for a in run):
        argv = list(run)
    else:
        raise TypeError(f"{owner}: {run!r} must be a command (a string such as \"lm_eval --model_args "
                        "pretrained={path}\", or a list of strings) or a callable taking the published checkpoint")
    if not argv:
        raise ValueError(f"{owner}: the command is empty; give a program and its arguments")
    for argument in argv:
        _check_template(argument, owner)
    _check_program(argv[0], owner)
    return argv


def _check_template(argument: str, owner: str) -> None:
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(argument) if field is not None]
        unknown = [field for field in fields if field not in FIELDS]
        if not unknown:
            argument.format(**_SAMPLE)
    except (ValueError, IndexError, KeyError) as exc:
        raise ValueError(f"{owner}: argument {argument!r} is not a valid template ({exc}); use "
                         f"{', '.join('{' + f + '}' for f in FIELDS)}, and double a literal brace ({{{{)") from None
    if unknown:
        raise ValueError(f"{owner}: argument {argument!r} names {{{unknown[0]}}}; the placeholders are "
                         f"{', '.join('{' + f + '}' for f in FIELDS)} (double a literal brace: {{{{)")


def _check_program(program: str, owner: str) -> None:
    if "{" in program.replace("{{", ""):
        raise ValueError(f"{owner}: the program {program!r} must be fixed, not a placeholder")
    if shutil.which(program) is None:
        raise ValueError(f"{owner}: program {program!r} is not an executable on PATH ({os.environ.get('PATH', '')}); "
                         "give its full path, or install it in this environment")


def command_for(argv: list[str], checkpoint: Published) -> list[str]:
    values = checkpoint.values()
    return [argument.format(**values) for argument in argv]


def environment_for(checkpoint: Published) -> dict[str, str]:
    return {**os.environ, **{f"OPEN_INSTRUCT_CKPT_{key.upper()}": str(value)
                             for key, value in checkpoint.values().items()}}


def describe(run: Any, argv: list[str] | None) -> str:
    """How a hook is named in log lines: its command line, or the callable's name."""
    if argv is None:
        return getattr(run, "__qualname__", None) or repr(run)
    return shlex.join(argv)


Call = Callable[[Published], Any]
