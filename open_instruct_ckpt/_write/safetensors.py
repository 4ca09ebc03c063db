"""Stream tensors into a safetensors file straight from their memory, hashing as the bytes go out.

`safetensors.torch.save_file` gives no checksum, so the manifest would have to read every
shard back. Here each tensor's bytes are written once, zero-copy, while a second thread feeds
the same buffers to sha256 (hashlib releases the GIL), so the checksum costs no extra pass.
The queue holds views of the tensors, not copies, so it needs no bound: writing runs at page
cache speed and the file's fsync (disk-bound) overlaps the hashing (CPU-bound).
The layout is the safetensors format: an 8-byte little-endian header length, a JSON header
padded with spaces to 8 bytes, then the tensor data in header order.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
from pathlib import Path

import torch
from safetensors.torch import _TYPES

from . import progress as _progress

_DTYPE_NAMES = {dtype: name for name, dtype in _TYPES.items()}
_CHUNK = 64 * 1024 * 1024


def _header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        end = offset + tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _chunks(tensor: torch.Tensor):
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    view = flat.data  # a memoryview of the tensor's bytes, no copy
    for start in range(0, len(view), _CHUNK):
        yield view[start : start + _CHUNK]


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write `tensors` (CPU) to `path` in safetensors format; returns the file's sha256 hex digest."""
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
    digest = hashlib.sha256()
    pending: queue.SimpleQueue = queue.SimpleQueue()
    hasher = threading.Thread(target=_hash_until_done, args=(digest, pending), daemon=True)
    hasher.start()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            header = _header(tensors, metadata)
            _write_all(fd, memoryview(header))
            pending.put(header)
            for tensor in tensors.values():
                for chunk in _chunks(tensor):
                    _write_all(fd, chunk)
                    pending.put(chunk)
                    _progress.advance(len(chunk))
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        pending.put(None)
        hasher.join()
    return digest.hexdigest()


def _write_all(fd: int, view: memoryview) -> None:
    # One large write(2) per chunk straight from the tensor's memory: no user-space buffer copy,
    # and the GIL is released for the whole system call (the hasher thread runs meanwhile).
    while view:
        view = view[os.write(fd, view):]


def _hash_until_done(digest, pending: queue.SimpleQueue) -> None:
    while (chunk := pending.get()) is not None:
        digest.update(chunk)
