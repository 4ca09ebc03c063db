"""Readers: find, list and verify checkpoints in an output directory.

Anything on disk may be malformed or hostile. Every public function here returns an answer for
any input: it never raises, never blocks (only regular files are read, opened without following
symlinks and without waiting) and never modifies anything, so evaluation jobs can poll it while
a run is writing. It imports nothing heavy.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from . import digest
from .manifest import MANIFEST_NAME, READABLE_FORMATS, TEMPORARY_PATTERN, has_weights, is_checkpoint_name, order_key
from .safetensors_header import header_problems

_MAX_JSON_BYTES = 64 * 1024 * 1024
_CHUNK = 16 * 1024 * 1024
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class Unreadable(Exception):
    """Internal: why a file cannot be read as a checkpoint file (caught inside this module)."""


# -- opening files safely ---------------------------------------------------------------------------

def _parts(relative: Any) -> list[str]:
    if not isinstance(relative, str) or not relative or "\0" in relative or relative.startswith("/"):
        raise Unreadable("not a valid relative file name")
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise Unreadable("path escapes the checkpoint directory")
    return parts


def open_inside(directory: Path, relative: Any) -> int:
    """A read-only descriptor of the regular file `directory/relative`, never through a symlink."""
    parts = _parts(relative)
    try:
        dir_fd = os.open(directory, _DIR_FLAGS)
    except OSError as exc:
        raise Unreadable(f"checkpoint directory unreadable ({exc.strerror})") from None
    try:
        for part in parts[:-1]:
            inner = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = inner
        fd = os.open(parts[-1], _READ_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise Unreadable(_open_failure(exc)) from None
    finally:
        os.close(dir_fd)
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    if not regular:
        os.close(fd)
        raise Unreadable("not a regular file")
    return fd


def _open_failure(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "missing"
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a symlink, or a symlinked or non-directory parent
        return "is a symbolic link or under one, not a regular file"
    return f"unreadable ({exc.strerror})"


def _read_all(fd: int, limit: int) -> bytes:
    size = os.fstat(fd).st_size
    if size > limit:
        raise Unreadable(f"{size} bytes, more than the {limit} a reader accepts")
    chunks = []
    while chunk := os.read(fd, _CHUNK):
        chunks.append(chunk)
    return b"".join(chunks)


def _load_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise Unreadable(f"not valid JSON ({type(exc).__name__})") from None


# -- the manifest -----------------------------------------------------------------------------------

def _load_manifest(directory: Path) -> dict[str, Any]:
    fd = open_inside(directory, MANIFEST_NAME)
    try:
        manifest = _load_json(_read_all(fd, _MAX_JSON_BYTES))
    except OSError as exc:
        raise Unreadable(f"unreadable ({exc.strerror})") from None
    finally:
        os.close(fd)
    problem = _schema_problem(manifest)
    if problem:
        raise Unreadable(problem)
    return manifest


def covering_manifest(directory: Path) -> dict[str, Any]:
    """The manifest that lists `directory`'s files: its own or, for a model inside a checkpoint (merged LoRA's
    `final/merged/`, which has none), the parent's, narrowed to the files under its name (relative to it, with
    `part_of` naming the parent). Raises Unreadable, for the directory's own manifest, when there is neither."""
    try:
        return _load_manifest(directory)
    except Unreadable as own:
        inside = None if os.path.lexists(directory / MANIFEST_NAME) else _inside_parent(directory)
        if inside is None:
            raise own
        return inside


def _inside_parent(directory: Path) -> dict[str, Any] | None:
    if os.path.islink(directory):
        return None
    try:
        parent = _load_manifest(directory.parent)
    except Unreadable:
        return None
    prefix = f"{directory.name}/"
    files = {name[len(prefix):]: entry for name, entry in parent["files"].items() if name.startswith(prefix)}
    if not has_weights(files):
        return None
    kept = {key: value for key, value in parent.items() if key not in ("files", "linked_from", "stats")}
    return {**kept, "files": files, "part_of": str(directory.parent)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _schema_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return "the manifest is not a JSON object"
    if manifest.get("format") not in READABLE_FORMATS:
        return f"format is {manifest.get('format')!r}, not one of {READABLE_FORMATS}"
    if not _is_int(manifest.get("step")) or manifest["step"] < 0:
        return f"step {manifest.get('step')!r} is not a non-negative integer"
    started = manifest.get("run_started_unix", 0.0)
    if not isinstance(started, (int, float)) or isinstance(started, bool) or not math.isfinite(started):
        return f"run_started_unix {started!r} is not a number"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "files is not a non-empty mapping of file names"
    for name, entry in files.items():
        problem = _name_problem(name) or _entry_problem(entry)
        if problem:
            return f"file entry {name!r}: {problem}"
    return None if has_weights(files) else "no weight or adapter file is listed"


def _name_problem(name: str) -> str | None:
    try:
        _parts(name)
    except Unreadable as exc:
        return str(exc)
    return None


def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return "not a mapping with bytes and a digest"
    if not _is_int(entry.get("bytes")) or entry["bytes"] < 0:
        return f"bytes {entry.get('bytes')!r} is not a non-negative integer"
    if digest.recorded(entry) is None:
        return f"no digest: {' or '.join(digest.ALGORITHMS)} of 64 lowercase hex digits"
    return None


def _size_problem(directory: Path, relative: str, expected: int) -> str | None:
    try:
        fd = open_inside(directory, relative)
    except Unreadable as exc:
        return f"{relative}: {exc}"
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return None if size == expected else f"{relative}: size {size} bytes, manifest says {expected}"


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of a complete checkpoint (valid, its files present with their sizes), or None."""
    try:
        manifest = _load_manifest(Path(directory))
        if any(_size_problem(Path(directory), name, e["bytes"]) for name, e in manifest["files"].items()):
            return None
        return manifest
    except (Unreadable, OSError):
        return None


# -- listing ----------------------------------------------------------------------------------------

def _candidates(root: Path) -> list[tuple[str, Path]]:
    """(checkpoint name, directory) pairs: checkpoint names, and orphaned `.old-<name>-<id>` copies
    standing in for a `<name>` that a crash left missing (the writer renames them back at start-up)."""
    try:
        with os.scandir(root) as scan:
            entries = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in scan]
    except OSError:
        return []
    present = {name for name, is_dir in entries if is_dir}
    found = []
    for name, is_dir in entries:
        match = TEMPORARY_PATTERN.fullmatch(name)
        if is_dir and is_checkpoint_name(name):
            found.append((name, root / name))
        elif is_dir and match and match.group(1) == "old" and is_checkpoint_name(match.group(2)):
            if match.group(2) not in present:
                found.append((match.group(2), root / name))
    return found


def complete_checkpoints(output_dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """Complete checkpoints directly under `output_dir`, oldest first.

    Order: the run that wrote them (a later run's checkpoints are newer, whatever their step),
    then step, then `final` on a tie. Anything that is not a complete checkpoint is skipped.
    """
    found = []
    for name, path in _candidates(Path(output_dir)):
        manifest = read_manifest(path)
        if manifest is not None:
            found.append((order_key(name, manifest), path, manifest))
    found.sort(key=lambda item: item[0])
    return [(path, manifest) for _, path, manifest in found]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under `output_dir` (see `complete_checkpoints`), or None.

    Safe to call from any process at any time: it reads only, takes no lock and never raises.
    """
    found = complete_checkpoints(output_dir)
    return found[-1][0] if found else None


# -- verifying --------------------------------------------------------------------------------------

def verify_checkpoint(path: str | Path) -> list[str]:
    """Re-read a checkpoint (or a model inside one) against its manifest; returns the problems found (empty when
    sound)."""
    directory = Path(path)
    try:
        manifest = covering_manifest(directory)
    except Unreadable as exc:
        return [f"{MANIFEST_NAME}: not a valid manifest ({exc})"]
    problems = []
    for relative, entry in manifest["files"].items():
        problems += _file_problems(directory, relative, entry)
    return problems


def _file_problems(directory: Path, relative: str, entry: dict[str, Any]) -> list[str]:
    try:
        fd = open_inside(directory, relative)
    except Unreadable as exc:
        return [f"{relative}: {exc}"]
    try:
        size = os.fstat(fd).st_size
        problems = []
        if relative.endswith(".safetensors"):
            problems += [f"{relative}: {p}" for p in header_problems(fd, size)]
        if size != entry["bytes"]:
            return [f"{relative}: size {size} bytes, manifest says {entry['bytes']}", *problems]
        algorithm, expected = digest.recorded(entry) or ("", "")
        if digest.of_fd(fd, algorithm) != expected:
            problems.append(f"{relative}: {algorithm} mismatch")
        return problems
    except OSError as exc:
        return [f"{relative}: unreadable ({exc.strerror})"]
    finally:
        os.close(fd)


