"""The run lock: one writing run per output_dir, re-entrant within a process.

A run that ended by an exception gets no `on_train_end`, so its lock may still be held when the
same process starts the next run in that output_dir: the lock is per process, and the newest
holder takes it over. `flock` needs no write access, so a lock file left by another user's
finished run (mode 0644) is locked through a read-only descriptor.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .._errors import CheckpointError

LOCK_NAME = ".open_instruct_ckpt.lock"

_held: dict[str, _Held] = {}  # output_dir (real path) -> this process's lock on it


class _Held:
    def __init__(self, fd: int, owner: object) -> None:
        self.fd, self.owner = fd, owner


class RunLockHeld(CheckpointError):
    """Another live process writes checkpoints into the same output_dir."""


class RunLock:
    """An exclusive `flock` on `<output_dir>/.open_instruct_ckpt.lock`, held by the writer for a run."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self._key = os.path.realpath(output_dir)

    def acquire(self) -> None:
        held = _held.get(self._key)
        if held is not None:  # this process holds it already, from a run that never reached on_train_end
            held.owner = self
            return
        fd = _open_lock_file(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockHeld(
                f"output_dir {self.path.parent} is in use by another run (pid {owner}); two runs must not "
                "share an output_dir: stop the other run or choose a different output_dir (a process idle after a "
                "train() that raised, such as an interrupted notebook, keeps the lock until it calls close() on its "
                "CheckpointCallback, starts its next run or exits)"
            ) from None
        _record_pid(fd)
        _held[self._key] = _Held(fd, self)

    def release(self) -> None:
        held = _held.get(self._key)
        if held is None or held.owner is not self:
            return
        del _held[self._key]
        fcntl.flock(held.fd, fcntl.LOCK_UN)
        os.close(held.fd)

    @property
    def held(self) -> bool:
        held = _held.get(self._key)
        return held is not None and held.owner is self


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except PermissionError:
        pass
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CheckpointError(
            f"cannot open the run lock file {path} ({exc.strerror}); it was left by another user's run: if no "
            f"run uses {path.parent}, remove it (rm {path}), or choose another output_dir"
        ) from exc


def _record_pid(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError:
        pass  # a read-only lock file keeps its old content; the lock itself is what counts
