"""An async save of a sharded model blocks only for each rank's own shard.

`take` (the blocking half, every rank): copy this rank's part of every sharded tensor of the plan (ZeRO-3's
partition, FSDP2's rows) into its host arena, and, on ranks that write, every plain tensor. `gather` (the
background half, every rank, on the background saves' own process group): for each module group in plan
order, rebuild each tensor from every rank's copy on the rank(s) that write it and hand the group to their
sinks, which stream it to disk. No rank ever holds more than its shard plus one module, and training never
waits for a gather.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._engines import Engine, shard_of
from .executor import Persist, Target, directories
from .plan import WritePlan
from .staging import Arena


@dataclass(frozen=True)
class _Kept:
    name: str
    engine: Engine | None  # None: a plain tensor, kept whole by ranks that write
    copy: torch.Tensor | None  # in the arena; None on a rank that neither shards nor writes it
    spec: Any = None


Snapshot = list[list[list[_Kept]]]  # directory -> group -> tensors, in plan order


def shardable(plan: WritePlan) -> bool:
    """Local: whether the plan holds sharded tensors and every one of them can be rebuilt from per-rank parts (a
    model no engine shards, under DDP or in one process, is copied whole where it is written)."""
    sharded = [t for _, sub in plan.walk() for _, tensors in sub.weights.groups for t in tensors.values()
               if _is_sharded(t)]
    return bool(sharded) and all(shard_of(t) is not None for t in sharded)


def _is_sharded(tensor: torch.Tensor) -> bool:
    from .._engines import is_sharded

    return is_sharded(tensor)


def arena_bytes(plan: WritePlan, writes: bool) -> int:
    """Bytes this rank's arena holds for `take`: its parts, and the plain tensors when it writes."""
    total = 0
    for _, sub in plan.walk():
        for _, tensors in sub.weights.groups:
            for tensor in tensors.values():
                found = shard_of(tensor)
                if found is not None:
                    total += found[1].numel() * found[1].element_size()
                elif writes:
                    total += tensor.numel() * tensor.element_size()
    return total


def take(plan: WritePlan, arena: Arena, writes: bool) -> Snapshot:
    """Local, blocking: copy this rank's parts (and, on ranks that write, the plain tensors) into the arena."""
    snapshot: Snapshot = []
    for _, sub in plan.walk():
        groups = []
        for _, tensors in sub.weights.groups:
            kept = []
            for name, tensor in tensors.items():
                found = shard_of(tensor)
                if found is not None:
                    engine, part, spec = found
                    kept.append(_Kept(name, engine, arena.copy(part), spec))
                else:
                    kept.append(_Kept(name, None, arena.copy(tensor) if writes else None))
            groups.append(kept)
        snapshot.append(groups)
    arena.settle()
    return snapshot


def gather(plan: WritePlan, snapshot: Snapshot, target: Target | None, group: Any, dst: int | None) -> Persist | None:
    """Collective over `group` (in the background on every rank): rebuild each group on `dst` (every rank when
    None) and hand it to this rank's sinks; returns what is left to write, on ranks with a target. If a sink
    fails, this rank still takes part in every remaining gather (the others would wait) and re-raises after."""
    persist = Persist(directories(plan, target), target) if target is not None else None
    failure: BaseException | None = None
    for index, groups in enumerate(snapshot):
        for kept in groups:
            state = _rebuilt(kept, group, dst)
            if persist is None or not state or failure is not None:
                continue
            try:
                persist.directories[index].consume(state, None)
            except Exception as exc:
                failure = exc
    if failure is not None:
        assert persist is not None
        persist.abort()
        raise failure
    return persist


def _rebuilt(kept: list[_Kept], group: Any, dst: int | None) -> dict[str, torch.Tensor]:
    state = {}
    for item in kept:
        if item.engine is not None:
            assert item.copy is not None
            full = item.engine.whole(item.copy, item.spec, group, dst)
            if full is not None:
                state[item.name] = full
        elif item.copy is not None:
            state[item.name] = item.copy
    return state
