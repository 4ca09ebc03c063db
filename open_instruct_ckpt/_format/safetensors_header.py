"""Safetensors headers, read and checked without trusting them: the layout, and that every tensor's data lies
inside the file. Stdlib only, never raises for what a file holds (see `_readers.py`)."""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path
from typing import Any

_MAX_SAFETENSORS_HEADER = 100 * 1000 * 1000  # the safetensors format's own limit
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def safetensors_header_problems(path: str | Path) -> list[str]:
    """Check a safetensors file's header: its layout, and that every tensor's data lies inside the file."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as exc:
        return [f"unreadable ({exc.strerror})"]
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ["not a regular file"]
        return header_problems(fd, os.fstat(fd).st_size)
    except OSError as exc:
        return [f"unreadable ({exc.strerror})"]
    finally:
        os.close(fd)


def header_problems(fd: int, size: int) -> list[str]:
    read = read_safetensors_header(fd, size)
    return [read] if isinstance(read, str) else _layout_problems(*read)


def read_safetensors_header(fd: int, size: int) -> tuple[dict[str, Any], int] | str:
    """The JSON header of the open safetensors file `fd` (`size` bytes) and the bytes of tensor data after it,
    or why it cannot be read as one. Never raises for what the file holds (OSError only from the reads)."""
    os.lseek(fd, 0, os.SEEK_SET)
    prefix = os.read(fd, 8)
    if len(prefix) < 8:
        return "truncated safetensors header (file shorter than 8 bytes)"
    (header_len,) = struct.unpack("<Q", prefix)
    if 8 + header_len > size:
        return f"truncated safetensors header ({header_len} header bytes declared, {size - 8} present)"
    if header_len > _MAX_SAFETENSORS_HEADER:
        return f"safetensors header of {header_len} bytes is over the format's limit"
    try:
        header = json.loads(os.read(fd, header_len))
    except (ValueError, RecursionError):
        return "corrupt safetensors header (not JSON)"
    if not isinstance(header, dict):
        return "corrupt safetensors header (not a JSON object)"
    return header, size - 8 - header_len


def _layout_problems(header: dict[str, Any], data_bytes: int) -> list[str]:
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                return ["corrupt safetensors header (__metadata__ is not an object)"]
            continue
        span = _tensor_span(info)
        if isinstance(span, str):
            return [f"corrupt safetensors header (tensor {name!r}: {span})"]
        spans.append(span)
    spans.sort()
    end = 0
    for begin, stop in spans:
        if begin != end:
            return [f"corrupt safetensors header (tensor data {'overlaps' if begin < end else 'leaves a gap'} at byte {begin})"]
        end = stop
    if end > data_bytes:
        return [f"truncated safetensors data ({end} bytes declared, {data_bytes} present)"]
    if end < data_bytes:
        return [f"corrupt safetensors data ({data_bytes - end} bytes after the last tensor)"]
    return []


def _tensor_span(info: Any) -> tuple[int, int] | str:
    if not isinstance(info, dict):
        return "entry is not an object"
    offsets, shape, dtype = info.get("data_offsets"), info.get("shape"), info.get("dtype")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        return "data_offsets is not a pair of integers"
    if not 0 <= offsets[0] <= offsets[1]:
        return f"data_offsets {offsets} are out of order"
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape) or not isinstance(dtype, str):
        return "shape or dtype is malformed"
    itemsize = _DTYPE_BYTES.get(dtype)
    if itemsize is not None and math.prod(shape) * itemsize != offsets[1] - offsets[0]:
        return f"{offsets[1] - offsets[0]} data bytes for shape {shape} of {dtype}"
    return offsets[0], offsets[1]
