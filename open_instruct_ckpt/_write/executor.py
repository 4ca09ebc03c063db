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
    """What a writer learned while writing: peak CPU bytes held and the sha256 it computed, by relative path."""

    peak_held_bytes: int = 0
    sha256: dict[str, str] = field(default_factory=dict)


@dataclass
class _Directory:
    relative: str
    plan: WritePlan
    sink: ShardWriter
    collected: ModuleState | None  # for a plan that transforms its whole state at the end (a PEFT adapter)

    def consume(self, state: ModuleState, copy: Copy | None) -> None:
        state = self.plan.weights.transform(state)
        if copy is not None:
            state = {name: copy(tensor) for name, tensor in state.items()}
        if self.collected is not None:
            self.collected.update(state)
        else:
            self.sink.add(state)

    def finish(self) -> None:
        if self.collected is not None and self.plan.weights.finish is not None:
            self.sink.add(self.plan.weights.finish(self.collected))
            self.collected = {}
        self.sink.finish()


class Persist:
    """Writer: write what the gather left to write, then every small file; returns the report."""

    def __init__(self, directories: list[_Directory], target: Target) -> None:
        self.directories, self.target = directories, target
        self.written = False  # every file is written (read by stall reports, from another thread)

    def __call__(self) -> WriteReport:
        report = WriteReport()
        for directory in self.directories:
            directory.finish()
            if self.target.small_files:
                _small_files(directory.plan, directory.sink.directory, self.target)
            report.peak_held_bytes = max(report.peak_held_bytes, directory.sink.peak_held_bytes)
            report.sha256.update({f"{directory.relative}{f}": h for f, h in directory.sink.sha256.items()})
        self.written = True
        return report

    def doing(self) -> str:
        """What this writer is on now, for stall reports: the first of its files not written yet."""
        for directory in self.directories:
            sink = directory.sink
            left = [f for f in sink.layout.files if sink.mine(f) and f not in sink.sha256]
            if left:
                return f"writing {sink.directory / left[0]}"
        if self.written:
            return "finishing: its files are written (other writers' reports, fsync, manifest, rename)"
        return "writing the small files (configs, tokenizer)"


def gather(plan: WritePlan, target: Target | None) -> Persist | None:
    """Collective: gather every group of every directory of `plan`, in order; None on ranks without a target."""
    if target is None:
        for _relative, sub in plan.walk():
            for_each_module_state(sub.weights.groups, None)
        return None
    directories = _directories(plan, target)
    for directory in directories:
        for_each_module_state(directory.plan.weights.groups, _consumer(directory, target.copy))
    return Persist(directories, target)


def _consumer(directory: _Directory, copy: Copy | None) -> Callable[[ModuleState], None]:
    return lambda state: directory.consume(state, copy)


def _directories(plan: WritePlan, target: Target) -> list[_Directory]:
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
