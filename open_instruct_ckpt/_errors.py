"""The public error type, and how an OS error becomes a message that says what to do."""

from __future__ import annotations

import errno
from pathlib import Path


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved; raised on every rank with the same message."""


_FIXES: dict[int | None, str] = {
    errno.ENOSPC: "free disk space (or lower keep_last) on that filesystem",
    errno.EDQUOT: "free space within your disk quota (or lower keep_last)",
    errno.EACCES: "fix the permissions of output_dir or choose another output_dir",
    errno.EPERM: "fix the permissions of output_dir or choose another output_dir",
    errno.EROFS: "choose an output_dir on a writable filesystem",
}


def explained(exc: BaseException, target: Path) -> BaseException:
    """An OSError during an unpublished save becomes a CheckpointError naming the checkpoint and the fix."""
    if not isinstance(exc, OSError):
        return exc
    fix = _FIXES.get(exc.errno, "check the disk and the filesystem under output_dir (see the OS error)")
    error = CheckpointError(
        f"writing checkpoint {target} failed: {exc}. Nothing was published under that name and earlier "
        f"checkpoints are untouched; {fix}, then restart (latest_checkpoint() finds the last complete one)"
    )
    error.__cause__ = exc
    return error
