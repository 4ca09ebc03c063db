"""Wrap the file operations of the checkpoint protocol so a process can die right after the k-th one.

Only operations on paths under `root` count. `install(root, crash_at=k)` makes the process
SIGKILL itself after the k-th counted operation completes; `crash_at=None` only records them.
"""

from __future__ import annotations

import builtins
import io
import os
import shutil
import signal
from pathlib import Path

import open_instruct_ckpt._write.layout as shards

try:  # the streaming safetensors writer, where present; else safetensors' own save_file
    import open_instruct_ckpt._write.safetensors as safetensors_writer
except ImportError:
    safetensors_writer = None

_WRITE_MODES = set("wax+")


class OpCounter:
    def __init__(self, root: Path, crash_at: int | None) -> None:
        self.root = str(Path(root).resolve())
        self.crash_at = crash_at
        self.log: list[tuple[int, str, str, str]] = []

    def done(self, op: str, path: str, target: str = "") -> None:
        if not (path.startswith(self.root) or target.startswith(self.root)):
            return
        self.log.append((len(self.log) + 1, op, path, target))
        if len(self.log) == self.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)


def _path(path, dir_fd=None) -> str:
    if isinstance(path, int):
        return os.readlink(f"/proc/self/fd/{path}")
    path = os.fsdecode(path)
    if dir_fd is not None and not os.path.isabs(path):
        return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    return os.path.abspath(path)


def install(root: Path, crash_at: int | None) -> OpCounter:
    """Wrap os/shutil/open/safetensors file operations for the rest of this process."""
    counter = OpCounter(root, crash_at)
    real = {name: getattr(os, name) for name in ("rename", "replace", "link", "mkdir", "rmdir", "unlink", "fsync")}

    def two_paths(name):
        def wrapped(src, dst, *args, **kwargs):
            result = real[name](src, dst, *args, **kwargs)
            counter.done(name, _path(src, kwargs.get("src_dir_fd")), _path(dst, kwargs.get("dst_dir_fd")))
            return result
        return wrapped

    def one_path(name):
        def wrapped(path, *args, **kwargs):
            resolved = _path(path, kwargs.get("dir_fd"))  # before rmdir/unlink removes it
            result = real[name](path, *args, **kwargs)
            counter.done(name, resolved)
            return result
        return wrapped

    def fsync(fd):
        result = real["fsync"](fd)
        counter.done("fsync", _path(fd if isinstance(fd, int) else fd.fileno()))
        return result

    real_open, real_copy2 = builtins.open, shutil.copy2
    module, attribute = (safetensors_writer, "write") if safetensors_writer else (shards, "save_file")
    real_save_file = getattr(module, attribute)

    def open_(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if not isinstance(file, int) and _WRITE_MODES & set(mode):
            counter.done("open-write", _path(file))
        return handle

    def save_file(*args, **kwargs):
        result = real_save_file(*args, **kwargs)
        filename = kwargs.get("path") or kwargs.get("filename") or next(a for a in args if isinstance(a, (str, Path)))
        counter.done("safetensors-write", _path(filename))
        return result

    def copy2(src, dst, *args, **kwargs):
        result = real_copy2(src, dst, *args, **kwargs)
        counter.done("copy2", _path(src), _path(dst))
        return result

    for name in ("rename", "replace", "link"):
        setattr(os, name, two_paths(name))
    for name in ("mkdir", "rmdir", "unlink"):
        setattr(os, name, one_path(name))
    os.fsync = fsync
    builtins.open = io.open = open_
    setattr(module, attribute, save_file)
    shutil.copy2 = copy2
    return counter
