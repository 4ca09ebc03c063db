"""Stream tensors into safetensors files front to back, straight from their memory, hashing as the bytes go out.

The header comes first, from the planned names, dtypes and shapes, so a file can be written while its
tensors are still being gathered: each tensor's bytes go out once, zero-copy, in header order, and a
second thread feeds the same buffers to the digest (blake3, which releases the GIL), so the checksum
costs no extra pass and, being faster than the write, no extra time. The digest thread reads views of
the caller's tensors, which keep their memory alive until it is done; the caller must not change them
before `close()` (a sync save's tensors are gathered copies or a paused model's, an async save's sit in
its arena).
The layout is the safetensors format: an 8-byte little-endian header length, a JSON header padded with
spaces to 8 bytes, then the tensor data in header order.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import _TYPES

from .._format import digest
from . import progress as _progress

DTYPE_NAMES = {dtype: name for name, dtype in _TYPES.items()}
_CHUNK = 64 * 1024 * 1024
_MIN_WRITEBACK = 1024 * 1024  # smaller writes (headers, norms) are left to fsync
_HASH_QUEUE = 2  # chunks written but not yet hashed, beyond the one being hashed: what the digest keeps alive
Planned = tuple[torch.dtype, tuple[int, ...]]  # what the header promises for one tensor


def header(planned: dict[str, Planned], metadata: dict[str, str] | None) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape) in planned.items():
        if dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        end = offset + torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        entries[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _chunks(tensor: torch.Tensor) -> Iterator[memoryview]:
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    view = flat.data  # a memoryview of the tensor's bytes, no copy
    for start in range(0, len(view), _CHUNK):
        yield view[start : start + _CHUNK]


def _libc_sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Linux: start writing these bytes to the disk now, without waiting, so the disk works while the next
    chunk is copied and the final fsync has little left to do; elsewhere (or where the filesystem declines)
    nothing happens and fsync does it all."""
    if _SYNC_FILE_RANGE is not None and nbytes >= _MIN_WRITEBACK:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


class FileStream:
    """One safetensors file, opened with its header and written tensor by tensor in header order."""

    def __init__(self, path: Path, planned: dict[str, Planned], metadata: dict[str, str] | None = None) -> None:
        self.path, self.planned = path, planned
        self._order = list(planned)
        self._next = 0
        self._digest = digest.new()
        self._pending: queue.Queue = queue.Queue(maxsize=_HASH_QUEUE)
        self._hash_error: BaseException | None = None
        self._hasher = threading.Thread(target=self._hash, name="open_instruct_ckpt-hash", daemon=True)
        self._hasher.start()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        self._written = 0
        self._send(memoryview(header(planned, metadata)))

    @property
    def expected(self) -> str | None:
        """The name of the tensor whose bytes come next, or None when every tensor is written."""
        return self._order[self._next] if self._next < len(self._order) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name != self.expected:
            raise RuntimeError(f"{self.path.name}: {name!r} written out of order (expected {self.expected!r})")
        dtype, shape = self.planned[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)} but the save planned {dtype} "
                               f"{tuple(shape)}; the model changed during the save")
        for chunk in _chunks(tensor):
            self._send(chunk)
            _progress.advance(len(chunk))
        self._next += 1

    def close(self) -> str:
        """fsync and close the complete file; returns its digest."""
        if self.expected is not None:
            raise RuntimeError(f"{self.path.name} closed before {self.expected!r} was written")
        try:
            os.fsync(self._fd)
        finally:
            self._finish()
        if self._hash_error is not None:
            raise RuntimeError(f"{self.path.name}: computing its digest failed") from self._hash_error
        return self._digest.hexdigest()

    def abort(self) -> None:
        """Close without completing (a failed save; the staging directory is discarded)."""
        self._finish()

    def _send(self, chunk: memoryview) -> None:
        view = chunk
        while view:  # one large write(2) per chunk from the tensor's memory; the GIL is released meanwhile
            view = view[os.write(self._fd, view):]
        self._pending.put(chunk)
        _start_writeback(self._fd, self._written, len(chunk))
        self._written += len(chunk)

    def _finish(self) -> None:
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        self._pending.put(StopIteration)
        self._hasher.join()

    def _hash(self) -> None:
        """Drains the queue to the end even after a failure, so the writer never blocks on a full queue."""
        while (chunk := self._pending.get()) is not StopIteration:
            if self._hash_error is None:
                try:
                    self._digest.update(chunk)
                except BaseException as exc:
                    self._hash_error = exc


def open_stream(path: Path, planned: dict[str, Planned], metadata: dict[str, str] | None = None) -> FileStream:
    """Create `path` and write its header: every safetensors file a save writes starts here."""
    return FileStream(path, planned, metadata)


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write `tensors` (CPU) to `path` in safetensors format, in their order; returns the file's digest."""
    stream = open_stream(path, {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}, metadata)
    try:
        for name, tensor in tensors.items():
            stream.write(name, tensor)
        return stream.close()
    except BaseException:
        stream.abort()
        raise
