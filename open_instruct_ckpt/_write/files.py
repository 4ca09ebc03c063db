"""Writer-side file protocol: stage, seal and publish checkpoint directories; recover and clean up.

Publishing `<output_dir>/<name>`:
 1. everything is written into a temporary sibling `.tmp-<name>-<id>` (same filesystem);
 2. every file is fsynced, then `checkpoint.json` (the manifest) is written last and fsynced,
    then the temporary directory itself;
 3. whatever sits under `<name>` is renamed aside to `.old-<name>-<id>`, the temporary directory
    is renamed to `<name>` (the commit point) and the parent directory is fsynced.
Everything after the commit point is clean-up: it never raises, and what it cannot remove
(files held open on NFS, a mount point, permissions) stays under a temporary name, is reported,
and is retried at the next save. Deleting renames the victim to `.trash-<name>-<id>` first, so no
half-deleted directory ever keeps a checkpoint name. Only the writer, holding the run lock,
calls anything here; readers live in `_readers.py`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import CheckpointError
from .._format.manifest import MANIFEST_NAME, TEMPORARY_PATTERN, describe_files, is_checkpoint_name
from .._format.readers import complete_checkpoints, read_manifest

logger = logging.getLogger(__name__)


def _temporary_path(output_dir: Path, kind: str, name: str) -> Path:
    return output_dir / f".{kind}-{name}-{uuid.uuid4().hex[:12]}"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_staging(output_dir: Path, name: str) -> Path:
    """A fresh temporary directory in which to write checkpoint `name`."""
    staging = _temporary_path(output_dir, "tmp", name)
    staging.mkdir(parents=True)
    return staging


def seal(
    staging: Path, manifest: dict[str, Any], files: dict | None = None, known: dict | None = None
) -> dict[str, Any]:
    """Make `staging` durable and complete: fsync every file, then write the manifest last.

    `files` are precomputed manifest entries (for hard-linked copies); otherwise every file is
    hashed, except those whose digest the writer computed while writing (`known`).
    Returns the manifest written.
    """
    for path in sorted(staging.rglob("*"), key=lambda p: (p.is_dir(), str(p))):
        fsync_path(path)  # every file, then every subdirectory
    manifest = {**manifest, "files": files if files is not None else describe_files(staging, known or {})}
    _write_synced(staging / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    fsync_path(staging)
    return manifest


@dataclass
class Published:
    """A checkpoint renamed into place, and the previous occupant of its name still to remove."""

    path: Path
    aside: Path | None


def publish(staging: Path, output_dir: Path, name: str) -> Published:
    """Rename the sealed `staging` to `<output_dir>/<name>`. Raises only before the commit point."""
    target = output_dir / name
    aside = _move_aside(target, "old") if os.path.lexists(target) else None
    try:
        os.rename(staging, target)
    except OSError:
        if aside is not None and not os.path.lexists(target):
            os.rename(aside, target)  # put the old copy back under its name
        raise
    try:
        fsync_path(output_dir)
    except OSError as exc:  # committed: the rename stands, only its durability is in doubt
        logger.warning("Published %s, but fsync of %s failed (%s); the rename may not survive a power loss",
                       target, output_dir, exc)
    return Published(target, aside)


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


def discard(staging: Path | None) -> None:
    """Remove an unpublished temporary directory (after a failed save); a leftover is retried later."""
    if staging is not None:
        remove_quietly(staging)


def hard_link_copy(source: Path, staging: Path) -> None:
    """Fill `staging` with hard links to `source`'s files (copies where linking fails)."""
    for path in sorted(p for p in source.rglob("*") if p.is_file() and not p.is_symlink()):
        relative = path.relative_to(source)
        if relative.as_posix() == MANIFEST_NAME:
            continue
        destination = staging / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, destination)
        except OSError:
            shutil.copy2(path, destination)


# -- best-effort clean-up: never raises, returns {what it left behind: why} -----------------------

def remove_quietly(path: Path) -> str | None:
    """Remove `path` without following symlinks; None when gone, else why it (or part of it) is still there."""
    failures: list[str] = []
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, onerror=lambda _f, failed, info: failures.append(f"{failed}: {info[1]}"))
    except OSError as exc:
        failures.append(str(exc))
    return failures[0] if failures else None


def prune(output_dir: Path, keep_last: int | None, just_saved: Path | None = None) -> dict[Path, str]:
    """Move the step checkpoints older than the `keep_last` newest to the trash, for `sweep` to delete.

    Newest means a later run, then a higher step (`complete_checkpoints` order). Never touches
    `final` nor `just_saved`. Returns the checkpoints that could not be moved, and why.
    """
    if keep_last is None:
        return {}
    steps = [path for path, _ in complete_checkpoints(output_dir) if is_checkpoint_name(path.name)
             and path.name != "final"]
    left: dict[Path, str] = {}
    for victim in [path for path in steps[: max(len(steps) - keep_last, 0)] if path != just_saved]:
        try:
            _move_aside(victim, "trash")
        except OSError as exc:
            left[victim] = f"not pruned: {exc}"
    return left


def sweep(output_dir: Path) -> dict[Path, str]:
    """Remove leftovers of earlier saves and clean-ups: every `.tmp-`, `.trash-` and `.old-` entry,
    except an orphaned `.old-` copy that `recover` can still rename back. Returns what stays, and why."""
    left = {}
    for path, kind, name in _temporaries(output_dir):
        if not _orphan(output_dir, path, kind, name):
            reason = remove_quietly(path)
            if reason:
                left[path] = reason
    return left


def _temporaries(output_dir: Path) -> list[tuple[Path, str, str]]:
    """(path, kind, checkpoint name) of each `.<kind>-<name>-<id>` entry, sorted by path."""
    try:
        paths = sorted(output_dir.iterdir())
    except OSError:
        return []
    return [(p, m.group(1), m.group(2)) for p in paths if (m := TEMPORARY_PATTERN.fullmatch(p.name))]


def _orphan(output_dir: Path, path: Path, kind: str, name: str) -> bool:
    """A complete `.old-<name>` directory whose `<name>` is not a directory: a crash between the renames."""
    if kind != "old" or not is_checkpoint_name(name) or _is_real_dir(output_dir / name):
        return False
    return _is_real_dir(path) and read_manifest(path) is not None


def recover(output_dir: Path) -> dict[Path, str]:
    """Start-up, under the run lock: rename orphaned `.old-` copies back, then sweep. Never raises.

    An orphan is a complete `.old-<name>` copy whose `<name>` is not a directory (a crash between
    the two renames); a file or symlink squatting on `<name>` is moved to the trash first.
    """
    for path, kind, name in _temporaries(output_dir):
        if not _orphan(output_dir, path, kind, name):
            continue
        target = output_dir / name
        try:
            if os.path.lexists(target):
                _move_aside(target, "trash")
            os.rename(path, target)
            fsync_path(output_dir)
        except OSError as exc:
            logger.warning("Could not restore %s to %s: %s", path, target, exc)
    return sweep(output_dir)


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


# -- start-up checks (writer) ----------------------------------------------------------------------

def ensure_writable(output_dir: Path) -> None:
    """Create `output_dir` and prove a directory can be made in it; raise a CheckpointError otherwise."""
    if os.path.lexists(output_dir) and not output_dir.is_dir():
        raise CheckpointError(f"output_dir {output_dir} is a file, not a directory; choose a directory path for output_dir")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = _temporary_path(output_dir, "tmp", "probe")
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise CheckpointError(
            f"output_dir {output_dir} is not writable ({exc.strerror}); fix its permissions or choose another"
        ) from exc


def free_bytes(output_dir: Path) -> int:
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # output_dir is created later, on the same filesystem
    return shutil.disk_usage(existing).free
