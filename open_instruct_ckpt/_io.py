"""Write checkpoint directories atomically, and find, recover and prune them. Writer-only.

Protocol for publishing `<output_dir>/<name>`:
 1. everything is written into a temporary sibling `.tmp-<name>-<id>` (same filesystem);
 2. every file is fsynced, then `checkpoint.json` (the manifest) is written last and fsynced,
    then the temporary directory itself;
 3. an existing `<name>` is renamed aside to `.old-<name>-<id>`, the temporary directory is
    renamed to `<name>`, the parent directory is fsynced, and the old copy is removed.
Deleting renames the victim to `.trash-<name>-<id>` first. A crash at any point leaves either
the old or the new complete checkpoint under `<name>` (or an `.old-` copy that recovery
renames back), never a partial directory under a checkpoint name.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from ._manifest import MANIFEST_NAME, complete_checkpoints, describe_files, is_checkpoint_name, read_manifest

LOCK_NAME = ".open_instruct_ckpt.lock"
_TEMPORARY = re.compile(r"\.(tmp|old|trash)-(.+)-[0-9a-f]{12}")


def _temporary_path(output_dir: Path, kind: str, name: str) -> Path:
    return output_dir / f".{kind}-{name}-{uuid.uuid4().hex[:12]}"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_staging(output_dir: Path, name: str) -> Path:
    """A fresh temporary directory in which to write checkpoint `name`."""
    staging = _temporary_path(output_dir, "tmp", name)
    staging.mkdir(parents=True)
    return staging


def publish(
    staging: Path,
    output_dir: Path,
    name: str,
    manifest: dict[str, Any],
    files: dict | None = None,
    known_sha256: dict[str, str] | None = None,
) -> Path:
    """Seal `staging` with its manifest and move it into place as `<output_dir>/<name>`.

    `files` are precomputed manifest entries (for hard-linked copies); otherwise every file is
    hashed, except those whose sha256 the writer computed while writing (`known_sha256`).
    Returns the published path.
    """
    for path in sorted(staging.rglob("*"), key=lambda p: (p.is_dir(), str(p))):
        fsync_path(path)  # every file, then every subdirectory
    manifest = {**manifest, "files": files if files is not None else describe_files(staging, known_sha256 or {})}
    _write_synced(staging / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    fsync_path(staging)
    target = output_dir / name
    aside = _move_aside(target, "old") if target.exists() else None
    _rename_in(staging, target, aside)
    fsync_path(output_dir)
    if aside is not None:
        shutil.rmtree(aside)
    return target


def _rename_in(staging: Path, target: Path, aside: Path | None) -> None:
    """Rename `staging` to `target`; if that fails, first put the old copy back under its name."""
    try:
        os.rename(staging, target)
    except OSError:
        if aside is not None and not target.exists():
            os.rename(aside, target)
            fsync_path(target.parent)
        raise


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _move_aside(path: Path, kind: str) -> Path:
    aside = _temporary_path(path.parent, kind, path.name)
    os.rename(path, aside)
    fsync_path(path.parent)
    return aside


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that a crash midway never leaves it half-deleted under its name."""
    shutil.rmtree(_move_aside(path, "trash"))


def discard(staging: Path | None) -> None:
    """Remove an unpublished temporary directory (after a failed save)."""
    if staging is not None and staging.exists():
        shutil.rmtree(staging, ignore_errors=True)


def hard_link_copy(source: Path, staging: Path) -> None:
    """Fill `staging` with hard links to `source`'s files (copies where linking fails)."""
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        relative = path.relative_to(source)
        if relative.as_posix() == MANIFEST_NAME:
            continue
        destination = staging / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:
            shutil.copy2(path, destination)


def recover(output_dir: Path) -> None:
    """Start-up cleanup under the run lock: restore orphaned old copies, delete our temporaries."""
    for path in sorted(output_dir.iterdir()):
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        kind, name = match.groups()
        if kind == "old" and _restorable(output_dir, name, path):
            os.rename(path, output_dir / name)
            fsync_path(output_dir)
        else:
            shutil.rmtree(path)


def _restorable(output_dir: Path, name: str, old: Path) -> bool:
    return is_checkpoint_name(name) and not (output_dir / name).exists() and read_manifest(old) is not None


def restore_orphans_if_idle(output_dir: Path) -> None:
    """For readers: restore orphaned old copies, but only when no run holds the lock."""
    if not output_dir.is_dir() or not any(p.name.startswith(".old-") for p in output_dir.iterdir()):
        return
    try:
        with RunLock(output_dir):
            recover(output_dir)
    except (OSError, RunLockHeld):
        return


def prune(output_dir: Path, keep_last: int | None, just_saved: Path | None = None) -> list[Path]:
    """Delete the step checkpoints older (by manifest step) than the `keep_last` newest.

    Never deletes `final` nor `just_saved`: the checkpoint this save published may have a lower
    step than an earlier run's checkpoints when a run restarted without resuming.
    """
    if keep_last is None:
        return []
    steps = [path for path, _ in complete_checkpoints(output_dir) if path.name != "final"]
    victims = [path for path in steps[: max(len(steps) - keep_last, 0)] if path != just_saved]
    for victim in victims:
        remove_checkpoint(victim)
    return victims


def free_space_problem(output_dir: Path, needed_bytes: int) -> str | None:
    """None if `needed_bytes` fit on the filesystem of `output_dir`, else a message saying what to do."""
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # output_dir is created later, on the same filesystem
    free = shutil.disk_usage(existing).free
    if free >= needed_bytes:
        return None
    return (
        f"not enough disk space in {output_dir}: a checkpoint needs {needed_bytes:,} bytes but only "
        f"{free:,} are free; free some space, lower keep_last, or choose another output_dir"
    )


def writable_problem(output_dir: Path) -> str | None:
    """None if checkpoints can be written under `output_dir`, else a message saying what to do."""
    if output_dir.exists() and not output_dir.is_dir():
        return f"output_dir {output_dir} is a file, not a directory; choose a directory path for output_dir"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = _temporary_path(output_dir, "tmp", "probe")
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        return f"output_dir {output_dir} is not writable ({exc.strerror}); fix its permissions or choose another"
    return None


class RunLockHeld(RuntimeError):
    """Another live run writes checkpoints into the same output_dir."""


class RunLock:
    """An exclusive `fcntl` lock on `<output_dir>/.open_instruct_ckpt.lock`, held by the writer for a run."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / LOCK_NAME
        self._handle = None

    def acquire(self) -> None:
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise RunLockHeld(
                f"output_dir {self.path.parent} is in use by another run (pid {owner}); two runs must not "
                "share an output_dir: stop the other run or choose a different output_dir"
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `output_dir` (`final` wins a tie), or None.

    Directories without a valid manifest are ignored. Safe to call from any process.
    """
    root = Path(output_dir)
    restore_orphans_if_idle(root)
    found = complete_checkpoints(root)
    return found[-1][0] if found else None
