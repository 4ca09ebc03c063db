"""The sink of a save's tensors: each safetensors file of a layout is written as soon as its tensors are in.

Writer-only. A `ShardWriter` receives transformed, gathered tensors and writes each file of the layout
once it is complete, so it holds at most one file plus one module. With `defer` (async saves: the tensors
already sit in the staging arena) nothing is written until `finish`. `owned` (writers="all") restricts it
to this rank's files; the index is written by the rank that also writes the small files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import safetensors
from .plan import Layout


def files_of_rank(layout: Layout, rank: int, world_size: int) -> set[str]:
    """writers="all": file i of the layout (in layout order) is written by rank i mod world_size."""
    return {f for i, f in enumerate(layout.files) if i % world_size == rank}


@dataclass
class ShardWriter:
    directory: Path
    layout: Layout
    owned: set[str] | None = None  # None: every file
    write_index: bool = True
    defer: bool = False
    held_bytes: int = 0
    peak_held_bytes: int = 0
    sha256: dict[str, str] = field(default_factory=dict)
    _file_of: dict[str, str] = field(default_factory=dict)
    _pending: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    _written: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._file_of = self.layout.file_of
        self._pending = {f: {} for f in self.layout.files}

    def mine(self, filename: str) -> bool:
        return self.owned is None or filename in self.owned

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if name not in self._file_of:
                raise RuntimeError(f"tensor {name!r} is not in the save's layout; the model changed during the save")
            if self.mine(self._file_of[name]):
                self._pending[self._file_of[name]][name] = tensor
                self.held_bytes += tensor.numel() * tensor.element_size()
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
        if not self.defer:
            self._write_complete()

    def _write_complete(self) -> None:
        for filename, names in self.layout.files.items():
            if self.mine(filename) and filename not in self._written and len(self._pending[filename]) == len(names):
                self._write(filename)

    def finish(self) -> None:
        """Write what is still pending, then the index (when the layout has one and this writer writes it)."""
        self._write_complete()
        missing = {f for f in self.layout.files if self.mine(f)} - self._written
        if missing:
            raise RuntimeError(f"shards never completed: {sorted(missing)}")
        if self.layout.index_name is not None and self.write_index:
            index = {"metadata": self.layout.index_metadata, "weight_map": dict(sorted(self._file_of.items()))}
            (self.directory / self.layout.index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def _write(self, filename: str) -> None:
        pending = self._pending[filename]
        shard = {n: pending[n] for n in self.layout.files[filename]}
        self.sha256[filename] = safetensors.write(self.directory / filename, shard, metadata={"format": "pt"})
        self.held_bytes -= sum(t.numel() * t.element_size() for t in pending.values())
        self._pending[filename] = {}
        self._written.add(filename)
