"""`open-instruct-ckpt verify`: the checkpoints a path stands for, and a verdict on each.

An output directory stands for its checkpoints, and a run may be writing and pruning there while
they are checked. Retention renames a checkpoint it drops away in one step, then deletes it, so a
checkpoint that fails its check and whose name is gone afterwards was removed, not damaged; one
replaced under its name during the check (a new save of the same name) is checked again. An output
directory whose only entry is a save in progress holds no damaged checkpoint either.
Like the readers it uses, it imports nothing heavy (torch only for `--load`) and never raises.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import inspect as _inspect
from .manifest import MANIFEST_NAME
from .readers import verify_checkpoint

_TRIES = 3  # checks of a checkpoint replaced under its name; listings of an output directory being pruned


@dataclass(frozen=True)
class Verdict:
    """`status` is OK, CORRUPT, REMOVED (gone during its check) or SAVING (nothing complete yet, a save in progress)."""

    path: Path
    status: str
    details: list[str] = field(default_factory=list)
    failed: bool = False
    loaded: str | None = None


def verdicts(paths: list[Path], load: bool) -> Iterator[Verdict]:
    """A verdict on each checkpoint, in order: a path given, or each checkpoint of an output directory."""
    for path in paths:
        if _is_directory(path) and not _exists(path / MANIFEST_NAME):
            yield from _output_directory(path, load)
        else:
            yield _verdict(path, load, listed=False)


def _output_directory(root: Path, load: bool) -> Iterator[Verdict]:
    """Each checkpoint listed; listed again, for the ones published since, when the run pruned one meanwhile."""
    checked: set[str] = set()
    for _ in range(_TRIES):
        entries = _inspect.list_checkpoints(root)
        fresh = [entry for entry in entries if not entry.name.startswith(".") and entry.name not in checked]
        if not checked and not fresh:
            yield _without_checkpoints(root, [entry.name for entry in entries], load)
            return
        removed = False
        for entry in fresh:
            checked.add(entry.name)
            verdict = _verdict(entry.path, load, listed=True)
            removed = removed or verdict.status == "REMOVED"
            yield verdict
        if not removed:
            return


def _without_checkpoints(root: Path, in_progress: list[str], load: bool) -> Verdict:
    if in_progress:
        return Verdict(root, "SAVING", [f"no complete checkpoint yet; a save is in progress: {', '.join(in_progress)}"])
    return _verdict(root, load, listed=False)  # not a checkpoint, and holds none: the check says why


def _verdict(path: Path, load: bool, listed: bool) -> Verdict:
    """A listed checkpoint, or a path given that existed when its check began, may vanish during the check."""
    for _ in range(_TRIES):
        before = _identity(path)
        problems, loaded = _check(path, load)
        after = _identity(path)
        if problems and after is None and (listed or before is not None):
            detail = "removed during the check (a run writing here prunes its old checkpoints), not damaged"
            return Verdict(path, "REMOVED", [detail], failed=not listed)
        if not problems or after == before:
            break
    return Verdict(path, "CORRUPT" if problems else "OK", problems, bool(problems), loaded)


def _check(path: Path, load: bool) -> tuple[list[str], str | None]:
    problems = _not_a_directory(path) or verify_checkpoint(path)
    if problems or not load:
        return problems, None
    from .loadcheck import LoadFailed
    from .loadcheck import load as load_checkpoint

    try:
        return [], load_checkpoint(path)
    except LoadFailed as exc:
        return [f"load failed: {exc}"], None


def _not_a_directory(path: Path) -> list[str]:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return ["does not exist"]
    except OSError as exc:
        return [f"unreadable ({exc.strerror})"]
    return [] if stat.S_ISDIR(mode) else ["is a file, not a directory"]


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _is_directory(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _exists(path: Path) -> bool:
    try:
        os.lstat(path)
    except OSError:
        return False
    return True
