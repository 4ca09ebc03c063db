"""Plan safetensors shards without touching tensor data, then write them as they fill.

The plan is what `PreTrainedModel.save_pretrained` would produce for the same model and
`max_shard_size` (same tied-weight removal, same reverted weight names, same `weight_map`),
computed from stored shapes so it needs no gather (ZeRO-3 or FSDP2).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from torch import nn
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import PrefixChange, revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from . import _safetensors
from ._gather import own_state, stored_numel, stored_shape

WEIGHTS_PATTERN = "model{suffix}.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "50GB"


@dataclass
class ShardPlan:
    """Where each saved tensor goes, and which module groups to gather in which order."""

    groups: list[tuple[nn.Module, dict[str, torch.Tensor]]]
    filename_to_names: dict[str, list[str]]
    index_metadata: dict
    is_sharded: bool
    revert_names: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]

    @property
    def total_bytes(self) -> int:
        return int(self.index_metadata["total_size"])


def plan_shards(model: nn.Module, max_shard_size: int | str | None) -> ShardPlan:
    """Collective-free: plan the files for `model`'s full state dict."""
    tensors = _saved_tensors(model)
    revert_names = _name_reverter(model)
    return split_plan(
        tensors, revert_names, max_shard_size, sum(stored_numel(p) for p in model.parameters()),
        lambda final_names: _groups_in_file_order(model, tensors, final_names, revert_names),
    )


def split_plan(
    tensors: dict[str, torch.Tensor],
    revert_names: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    max_shard_size: int | str | None,
    total_parameters: int,
    groups: Callable[[list[str]], list],
) -> ShardPlan:
    """The files `save_pretrained` would write for `tensors` (keyed by their names before `revert_names`);
    `groups(final names)` gives the gather order."""
    final_meta = revert_names({name: _meta_like(t) for name, t in tensors.items()})
    split = split_torch_state_dict_into_shards(
        final_meta, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE
    )
    return ShardPlan(
        groups=groups(list(final_meta)),
        filename_to_names={f: list(names) for f, names in split.filename_to_tensors.items()},
        index_metadata={"total_parameters": total_parameters, **split.metadata},
        is_sharded=split.is_sharded,
        revert_names=revert_names,
    )


def files_of_rank(plan: ShardPlan, rank: int, world_size: int) -> set[str]:
    """writers="all": file i of the plan (in plan order) is written by rank i mod world_size."""
    return {f for i, f in enumerate(plan.filename_to_names) if i % world_size == rank}


@dataclass(frozen=True)
class ShardShare:
    """writers="all": this rank's part of a save. It writes its `files_of_rank`; the publisher (rank 0)
    also writes the index and the configs."""

    rank: int
    world_size: int
    publisher: bool


def saved_bytes(model: nn.Module) -> int:
    """Collective-free: the weight bytes a plan of `model` would hold, without planning (no shard split,
    no name reverting, no module walk); the disk-space check needs only this, the write plans once."""
    return sum(stored_numel(t) * t.element_size() for t in _saved_tensors(model).values())


def _name_reverter(model: nn.Module) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Undo transformers' load-time weight conversions, as `save_pretrained` does; identity when there are none.

    Decided once per plan: looking the conversions up walks the whole model every time.
    """
    if isinstance(model, PreTrainedModel) and _has_weight_conversions(model):
        return lambda state: revert_weight_conversion(model, state)
    return lambda state: state


def _has_weight_conversions(model: PreTrainedModel) -> bool:
    # The same test `revert_weight_conversion` makes before returning its input unchanged. A model
    # from `from_pretrained` carries its list even when empty, and then the revert re-sorts the keys,
    # which moves tensors between shard files.
    if getattr(model, "_weight_conversions", None) is not None:
        return True
    conversions = get_model_conversion_mapping(model, add_legacy=False)
    return any(not isinstance(c, PrefixChange) for c in conversions)


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(stored_shape(tensor), dtype=tensor.dtype, device="meta")


def _saved_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors that `save_pretrained` would write, tied duplicates removed."""
    state = dict(model.state_dict(keep_vars=True))
    for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
        state.pop(key, None)
    kept = _untied_names(model, state)
    return {name: t for name, t in state.items() if name in kept}


def _untied_names(model: nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    # Tied names share one Parameter object. One small proxy per object stands in for the
    # (possibly partitioned) data, so transformers' own tie logic decides which name stays.
    proxies: dict[int, torch.Tensor] = {}
    by_name = {name: proxies.setdefault(id(t), torch.zeros(1)) for name, t in state.items()}
    if isinstance(model, PreTrainedModel):
        return set(remove_tied_weights_from_state_dict(by_name, model))
    first_name: dict[int, str] = {}
    for name, t in state.items():
        first_name.setdefault(id(t), name)
    return set(first_name.values())


def _groups_in_file_order(
    model: nn.Module, tensors: dict[str, torch.Tensor], final_order: list[str], revert_names: Callable
) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
    position = {name: i for i, name in enumerate(final_order)}
    groups = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        own = {n: t for n, t in own_state(module, f"{prefix}." if prefix else "").items() if n in tensors}
        if own:
            final_names = revert_names({n: _meta_like(t) for n, t in own.items()})
            groups.append((min(position[n] for n in final_names), module, own))
    groups.sort(key=lambda g: g[0])
    return [(module, own) for _, module, own in _unique_groups(groups)]


def _unique_groups(groups: list) -> list:
    seen: set[str] = set()
    unique = []
    for position, module, own in groups:
        fresh = {n: t for n, t in own.items() if n not in seen}
        seen.update(fresh)
        if fresh:
            unique.append((position, module, fresh))
    return unique


@dataclass
class ShardWriter:
    """Writer-only: receives gathered tensors and writes each shard file once it is complete.

    With `defer` (async saves: the tensors already sit in the staging arena) nothing is written
    until `finish`, which then writes every file. `held_bytes` counts the CPU bytes waiting to be
    written; `peak_held_bytes` its maximum.
    """

    directory: Path
    plan: ShardPlan
    defer: bool = False
    share: ShardShare | None = None  # writers="all"; None: this writer writes every file and the index
    held_bytes: int = 0
    peak_held_bytes: int = 0
    _file_of: dict[str, str] = field(default_factory=dict)
    _pending: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    _written: set[str] = field(default_factory=set)
    sha256: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._file_of = {n: f for f, names in self.plan.filename_to_names.items() for n in names}
        self._pending = {f: {} for f in self.plan.filename_to_names}
        share = self.share
        self.owned = files_of_rank(self.plan, share.rank, share.world_size) if share else None  # None: every file
        self.write_index = share is None or share.publisher

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if name not in self._file_of:
                raise RuntimeError(f"tensor {name!r} is not in the shard plan; the model changed during the save")
            if self.owned is not None and self._file_of[name] not in self.owned:
                continue  # another rank writes that file
            self._pending[self._file_of[name]][name] = tensor
            self.held_bytes += tensor.numel() * tensor.element_size()
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
        if not self.defer:
            self._write_complete()

    def _write_complete(self) -> None:
        for filename, names in self.plan.filename_to_names.items():
            mine = self.owned is None or filename in self.owned
            if mine and filename not in self._written and len(self._pending[filename]) == len(names):
                self._write(filename)

    def finish(self) -> list[str]:
        """Write what is still pending, then the index (when sharded); return the weight file names written."""
        self._write_complete()
        missing = (self.owned if self.owned is not None else set(self.plan.filename_to_names)) - self._written
        if missing:
            raise RuntimeError(f"shards never completed: {sorted(missing)}")
        if self.plan.is_sharded and self.write_index:
            index = {"metadata": self.plan.index_metadata, "weight_map": dict(sorted(self._file_of.items()))}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return sorted(self._written)

    def _write(self, filename: str) -> None:
        names = self.plan.filename_to_names[filename]
        shard = {n: self._pending[filename][n] for n in names}
        self.sha256[filename] = _safetensors.write(self.directory / filename, shard, metadata={"format": "pt"})
        self.held_bytes -= sum(t.numel() * t.element_size() for t in self._pending[filename].values())
        self._pending[filename] = {}
        self._written.add(filename)
