"""A write plan: what one save writes, never how. Strategies build it; `_write.executor` carries it out.

- `Weights`: the tensors to gather, in gather order (module groups of live tensors), how each gathered
  group becomes saved tensors (`transform`: names and values, e.g. the LoRA merge), and the files they go to
  (`layout`, computed from stored shapes, as `save_pretrained` lays them out).
- `SmallFile`s: configs, the PEFT adapter config, a model card (written by the executor into the directory).
- sub-directories: another plan per name (`merged/` of a merged LoRA final).
The run's tokenizer and generation config are not the strategy's: the executor adds them where a plan
says (`tokenizer`, `generation_module`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._engines import Group, meta_like, stored_nbytes

Transform = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def unchanged(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return state


@dataclass(frozen=True)
class Layout:
    """Which saved tensor goes to which file, in the order the gather delivers them (each file is written front to
    back as its tensors arrive), with the dtype and shape the header promises; the index (when sharded) is
    written beside them."""

    files: dict[str, list[str]]  # file name -> saved tensor names, in write order
    planned: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # saved name -> (dtype, shape)
    index_name: str | None = None  # "model.safetensors.index.json" when sharded
    index_metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def file_of(self) -> dict[str, str]:
        return {name: file for file, names in self.files.items() for name in names}

    def bytes_of(self, names: list[str]) -> int:
        return sum(_nbytes(*self.planned[name]) for name in names)

    @property
    def total_bytes(self) -> int:
        return self.bytes_of(list(self.planned))


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()


def arrival_order(groups: list[Group], transform: Transform) -> dict[str, torch.Tensor]:
    """The saved tensors (as meta tensors) in the order the executor produces them: each group's gathered tensors
    through `transform`, group after group. Transforms run on meta tensors here (shapes and dtypes only)."""
    order: dict[str, torch.Tensor] = {}
    for _, tensors in groups:
        order.update(transform({name: meta_like(t) for name, t in tensors.items()}))
    return order


@dataclass(frozen=True)
class Weights:
    groups: list[Group]
    layout: Layout
    transform: Transform = unchanged  # per gathered group: live names and values -> saved ones
    finish: Transform | None = None  # once every group is in (a PEFT adapter's state dict): small states only

    @property
    def stored_bytes(self) -> int:
        """Bytes of the saved tensors, from stored shapes (no gather)."""
        return self.layout.total_bytes

    @property
    def gathered_bytes(self) -> int:
        """Bytes of the tensors gathered (a merge gathers LoRA factors it does not save)."""
        return sum(stored_nbytes(t) for _, tensors in self.groups for t in tensors.values())


@dataclass(frozen=True)
class SmallFile:
    """One or a few small files that `write(directory)` puts into the checkpoint directory."""

    what: str
    write: Callable[[Path], None]


@dataclass(frozen=True)
class WritePlan:
    weights: Weights
    small_files: tuple[SmallFile, ...] = ()
    subdirectories: dict[str, WritePlan] = field(default_factory=dict)
    generation_module: nn.Module | None = None  # its generation config is written here, when it can generate
    tokenizer: bool = True  # the run's tokenizer is written here
    final_only: bool = False  # parts only a final save writes: final/ cannot be hard links to the last step

    def walk(self, prefix: str = "") -> list[tuple[str, WritePlan]]:
        """This plan and every sub-directory plan, with their relative directories ("" first), in write order."""
        found = [(prefix, self)]
        for name, sub in self.subdirectories.items():
            found += sub.walk(f"{prefix}{name}/")
        return found

    @property
    def stored_bytes(self) -> int:
        return sum(plan.weights.stored_bytes for _, plan in self.walk())

    @property
    def links_to_steps(self) -> bool:
        """Whether a final save of this plan may be hard links to a step checkpoint of the same step."""
        return not any(plan.final_only for _, plan in self.walk())
