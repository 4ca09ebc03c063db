"""Carry out a write plan: every file of every strategy goes through here, hashed and measured the same way.

A save is two calls. `gather` is collective: every rank walks the plan's groups in the same order (the
engines gather each module); a rank that writes transforms each gathered group, copies it into the
staging arena (async saves) and hands it to the directory's `ShardWriter`, which writes each file as it
fills (sync) or holds it (async). The returned `Persist` then writes what is left and the small files:
inline for a sync save, in the background for an async one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._engines import ModuleState, for_each_module_state
from .plan import WritePlan
from .shards import ShardWriter

Copy = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Target:
    """What this rank writes of a save, and where."""

    directory: Path
    owned: Callable[[Any], set[str] | None]  # layout -> this rank's files (None: all of them)
    small_files: bool  # this rank writes the small files and indexes (the publisher)
    tokenizer: Any
    generation_config: Any  # built and validated for this save, or None
    copy: Copy | None = None  # async saves: a true copy into the staging arena


@dataclass
class WriteReport:
    """What a writer learned while writing: peak CPU bytes held and the digests it computed, by relative path."""

    peak_held_bytes: int = 0
    digests: dict[str, str] = field(default_factory=dict)


@dataclass
class _Directory:
    relative: str
    plan: WritePlan
    sink: ShardWriter
    collected: ModuleState | None  # for a plan that transforms its whole state at the end (a PEFT adapter)

    def consume(self, state: ModuleState, copy: Copy | None) -> None:
        """One gathered group; without `copy` its tensors are lent (valid only during this call)."""
        state = self.plan.weights.transform(state)
        if copy is not None:  # only what this rank writes (writers="all": its share) goes into its arena
            state = {name: copy(tensor) for name, tensor in state.items() if self.wanted(name)}
        if self.collected is not None:
            self.collected.update(state if copy is not None else {n: t.clone() for n, t in state.items()})
        else:
            self.sink.add(state, lent=copy is None)

    def wanted(self, name: str) -> bool:
        """A transformed tensor this rank writes (a whole state to convert at the end: all, if it writes the file)."""
        return self.sink.owns_files if self.collected is not None else self.sink.keeps(name)

    def finish(self) -> None:
        if self.collected is not None and self.plan.weights.finish is not None:
            self.sink.add(self.plan.weights.finish(self.collected), lent=False)
            self.collected = {}
        self.sink.finish()


class Persist:
    """Writer: write what the gather left to write, then every small file; returns the report."""

    def __init__(self, directories: list[_Directory], target: Target) -> None:
        self.directories, self.target = directories, target
        self.written = False  # every file is written (read by stall reports, from another thread)

    def __call__(self) -> WriteReport:
        report = WriteReport()
        try:
            for directory in self.directories:
                directory.finish()
                self._write_small_files(directory, report)
        except BaseException:
            self.abort()
            raise
        self.written = True
        return report

    def doing(self) -> str:
        """What this writer is on now, for stall reports: the first of its files not written yet."""
        for directory in self.directories:
            sink = directory.sink
            left = [f for f in sink.layout.files if sink.mine(f) and f not in sink.digests]
            if left:
                return f"writing {sink.directory / left[0]}"
        if self.written:
            return "finishing: its files are written (other writers' reports, fsync, manifest, rename)"
        return "writing the small files (configs, tokenizer)"

    def abort(self) -> None:
        for directory in self.directories:
            directory.sink.abort()

    def _write_small_files(self, directory: _Directory, report: WriteReport) -> None:
        if self.target.small_files:
            _small_files(directory.plan, directory.sink.directory, self.target)
        report.peak_held_bytes = max(report.peak_held_bytes, directory.sink.peak_held_bytes)
        report.digests.update({f"{directory.relative}{f}": h for f, h in directory.sink.digests.items()})


def gather(plan: WritePlan, target: Target | None) -> Persist | None:
    """Collective: gather every group of every directory of `plan`, in order; None on ranks without a target."""
    if target is None:
        for _relative, sub in plan.walk():
            for_each_module_state(sub.weights.groups, None)
        return None
    persist = Persist(directories(plan, target), target)
    try:
        for directory in persist.directories:
            for_each_module_state(directory.plan.weights.groups, _consumer(directory, target.copy),
                                  on_host=target.copy is None)
    except BaseException:
        persist.abort()
        raise
    return persist


def _consumer(directory: _Directory, copy: Copy | None) -> Callable[[ModuleState], None]:
    return lambda state: directory.consume(state, copy)


def directories(plan: WritePlan, target: Target) -> list[_Directory]:
    found = []
    for relative, sub in plan.walk():
        path = target.directory / relative
        path.mkdir(parents=True, exist_ok=True)
        sink = ShardWriter(path, sub.weights.layout, owned=target.owned(sub.weights.layout),
                           write_index=target.small_files, defer=target.copy is not None)
        found.append(_Directory(relative, sub, sink, {} if sub.weights.finish is not None else None))
    return found


def _small_files(plan: WritePlan, directory: Path, target: Target) -> None:
    for small in plan.small_files:
        small.write(directory)
    module = plan.generation_module
    if target.generation_config is not None and module is not None and _can_generate(module):
        target.generation_config.save_pretrained(directory)
    if plan.tokenizer:
        target.tokenizer.save_pretrained(str(directory))


def _can_generate(module: Any) -> bool:
    can_generate = getattr(module, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else False


def write_small_files(plan: WritePlan, directory: Path, tokenizer: Any, generation_config: Any) -> None:
    """Every small file of `plan` (all its directories) into `directory`: what start-up measures for the space check."""
    target = Target(directory, lambda layout: None, True, tokenizer, generation_config)
    for relative, sub in plan.walk():
        (directory / relative).mkdir(parents=True, exist_ok=True)
        _small_files(sub, directory / relative, target)
