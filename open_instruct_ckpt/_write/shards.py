"""The sink of a save's tensors: each safetensors file of a layout is streamed front to back as its tensors arrive.

Writer-only. A `ShardWriter` receives transformed, gathered tensors. A file is opened (header first, from the
layout's planned dtypes and shapes) when its first tensor arrives; a tensor that is next in its file is written
at once, one that arrives early is held (copied, when the caller only lends it) until its turn. So the writer
holds at most one module plus what arrives out of order, whatever the file sizes. With `defer` (async saves:
the tensors already sit in the staging arena) nothing is written until `finish`. `owned` (writers="all")
restricts it to this rank's files; the index is written by the rank that also writes the small files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import safetensors
from .plan import Layout
from .safetensors import FileStream


def files_of_rank(layout: Layout, rank: int, world_size: int) -> set[str]:
    """writers="all": file i of the layout (in layout order) is written by rank i mod world_size."""
    return {f for i, f in enumerate(layout.files) if i % world_size == rank}


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass
class ShardWriter:
    directory: Path
    layout: Layout
    owned: set[str] | None = None  # None: every file
    write_index: bool = True
    defer: bool = False
    held_bytes: int = 0
    peak_held_bytes: int = 0
    digests: dict[str, str] = field(default_factory=dict)
    _file_of: dict[str, str] = field(default_factory=dict)
    _early: dict[str, torch.Tensor] = field(default_factory=dict)  # arrived before their turn in their file
    _streams: dict[str, FileStream] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._file_of = self.layout.file_of

    def mine(self, filename: str) -> bool:
        return self.owned is None or filename in self.owned

    def keeps(self, name: str) -> bool:
        """Whether the saved tensor `name` goes to a file this writer writes."""
        return name in self._file_of and self.mine(self._file_of[name])

    @property
    def owns_files(self) -> bool:
        return any(self.mine(filename) for filename in self.layout.files)

    def add(self, tensors: dict[str, torch.Tensor], lent: bool = True) -> None:
        """Take gathered tensors. `lent`: they are valid only during this call (a gather's own memory), so what
        cannot be written now is copied; otherwise (arena copies) they are kept as they are."""
        arriving = {}
        for name, tensor in tensors.items():
            if name not in self._file_of:
                raise RuntimeError(f"tensor {name!r} is not in the save's layout; the model changed during the save")
            if self.mine(self._file_of[name]):
                arriving[name] = tensor
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes + sum(_nbytes(t) for t in arriving.values()))
        self._early.update(arriving)
        if not self.defer:
            self._write_ready(list(dict.fromkeys(self._file_of[name] for name in arriving)))
            for name in arriving:
                if lent and name in self._early:
                    self._early[name] = self._early[name].clone()  # held past this call: our own copy
        self.held_bytes = sum(_nbytes(t) for t in self._early.values())

    def _write_ready(self, filenames: list[str]) -> None:
        """Write every tensor whose turn has come in these files; the others stay in `_early`."""
        streams = [(filename, self._stream(filename)) for filename in filenames]
        for _, stream in streams:
            while (name := stream.expected) is not None and name in self._early:
                stream.write(name, self._early.pop(name))
        for filename, stream in streams:
            if stream.expected is None and filename not in self.digests:
                self.digests[filename] = stream.close()

    def _stream(self, filename: str) -> FileStream:
        if filename not in self._streams:
            names = self.layout.files[filename]
            planned = {name: self.layout.planned[name] for name in names}
            self._streams[filename] = safetensors.open_stream(self.directory / filename, planned, {"format": "pt"})
        return self._streams[filename]

    def finish(self) -> None:
        """Write what is still pending, then the index (when the layout has one and this writer writes it)."""
        self._write_ready([f for f in self.layout.files if self.mine(f) and f not in self.digests])
        missing = {f for f in self.layout.files if self.mine(f)} - set(self.digests)
        if missing:
            raise RuntimeError(f"shards never completed: {sorted(missing)}")
        self.held_bytes = 0
        if self.layout.index_name is not None and self.write_index:
            index = {"metadata": self.layout.index_metadata, "weight_map": dict(sorted(self._file_of.items()))}
            (self.directory / self.layout.index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def abort(self) -> None:
        """A failed save: close every open file (the staging directory is discarded)."""
        for filename, stream in self._streams.items():
            if filename not in self.digests:
                stream.abort()
