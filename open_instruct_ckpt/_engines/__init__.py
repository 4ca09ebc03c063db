"""The engine seam: stored shapes and a module-by-module gather, whichever engine shards the model.

Strategies and the writer call only the functions here. Each engine (`zero3`, `fsdp2`) is one module
with one `Engine` object in `ENGINES`; a tensor no engine claims is plain (read in place on CPU, copied
from an accelerator). A new engine is one module plus one line in `ENGINES`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from . import fsdp2, zero3

ModuleState = dict[str, torch.Tensor]
Group = tuple[nn.Module, dict[str, torch.Tensor]]


class Engine(Protocol):
    """What the writer needs from a sharding engine. Collective methods must be called by every rank in the
    same order with the same tensors."""

    name: str

    def owns(self, tensor: torch.Tensor) -> bool:
        """Local: whether this engine shards `tensor`."""

    def full_shape(self, tensor: torch.Tensor) -> torch.Size:
        """Local: the tensor's full (unsharded) shape, without a gather."""

    def gathered(self, tensors: dict[str, torch.Tensor], keep: bool) -> contextlib.AbstractContextManager[ModuleState]:
        """Collective: the full tensors (CPU copies when `keep`, else `{}`) while the context is open."""

    def settle(self, model: nn.Module) -> None:
        """Local: put parameters back in their resting (sharded) form before a save plans."""

    def original_class(self, module: nn.Module) -> type | None:
        """The module's own class where the engine substituted a wrapper class, else None."""

    def unsupported(self, state: Any, model: nn.Module | None) -> str | None:
        """Local: why this set-up cannot be saved, with the fix; None when it can."""

    def trainer_checkpoint_warning(self, args: Any, state: Any) -> str | None:
        """A warning when the Trainer's own checkpoints would gather the whole model on one rank."""

    def shard_of(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any] | None:
        """Local: this rank's own part of `tensor` (a view, to be copied) and what `whole` needs to rebuild the
        tensor from every rank's part; None when that is not possible (the save then gathers while training waits)."""

    def whole(self, part: torch.Tensor, spec: Any, group: Any, dst: int | None) -> torch.Tensor | None:
        """Collective over `group` (every rank, same order): the full tensor from each rank's copy of its part, on
        global rank `dst` (on every rank when None); None elsewhere."""


ENGINES: tuple[Engine, ...] = (zero3.ENGINE, fsdp2.ENGINE)


def engine_of(tensor: torch.Tensor) -> Engine | None:
    return next((engine for engine in ENGINES if engine.owns(tensor)), None)


def is_sharded(tensor: torch.Tensor) -> bool:
    return engine_of(tensor) is not None


def stored_shape(tensor: torch.Tensor) -> torch.Size:
    """The full shape of a tensor, sharded or not; needs no gather."""
    engine = engine_of(tensor)
    return engine.full_shape(tensor) if engine is not None else tensor.shape


def stored_numel(tensor: torch.Tensor) -> int:
    return stored_shape(tensor).numel()


def stored_nbytes(tensor: torch.Tensor) -> int:
    return stored_numel(tensor) * tensor.element_size()


def meta_like(tensor: torch.Tensor) -> torch.Tensor:
    """A meta tensor with the stored shape and dtype: what planning needs of a tensor, without its data."""
    return torch.empty(stored_shape(tensor), dtype=tensor.dtype, device="meta")


def own_state(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The module's own parameters and persistent buffers (not its children's), keyed by full name."""
    state: dict[str, torch.Tensor] = {f"{prefix}{n}": p for n, p in module.named_parameters(recurse=False)}
    skipped: set[str] = getattr(module, "_non_persistent_buffers_set", set())
    for name, buffer in module.named_buffers(recurse=False):
        if buffer is not None and name not in skipped:
            state[f"{prefix}{name}"] = buffer
    return state


def settle(model: nn.Module) -> None:
    """Local: every engine puts its parameters back in their resting (sharded) form; call before planning."""
    for engine in ENGINES:
        engine.settle(model)


def model_class(module: nn.Module) -> type:
    """The module's own class, past any wrapper class an engine substituted (FSDP2's `FSDP<Name>`)."""
    for engine in ENGINES:
        original = engine.original_class(module)
        if original is not None:
            return original
    return type(module)


def for_each_module_state(groups: Sequence[Group], consume: Callable[[ModuleState], Any] | None,
                          on_host: bool = True) -> None:
    """Collective: gather each group's tensors in turn and hand them to `consume` (on ranks that write).

    `groups` is `(module, {full_name: tensor})` pairs, identical and identically ordered on every
    rank. Ranks that only gather pass `consume=None` and keep nothing. The tensors are lent: valid only
    during `consume`. With `on_host=False` plain tensors stay where they are (an async save copies them
    off the accelerator itself, without blocking). If `consume` raises, the rank still enters every
    remaining gather (so the other ranks do not hang) and re-raises afterwards.
    """
    failure: BaseException | None = None
    for _module, tensors in groups:
        keep = consume is not None and failure is None
        with _gathered(tensors, keep, on_host) as state:
            if consume is None or not keep:
                continue
            try:
                consume(state)
            except Exception as exc:  # re-raised below, after the last collective
                failure = exc
    if failure is not None:
        raise failure


@contextlib.contextmanager
def _gathered(tensors: dict[str, torch.Tensor], keep: bool, on_host: bool = True) -> Iterator[ModuleState]:
    """Collective: one group's tensors, each engine gathering its own; `{}` unless `keep`."""
    with contextlib.ExitStack() as stack:
        state: ModuleState = {}
        for engine in ENGINES:
            mine = {name: t for name, t in tensors.items() if engine.owns(t)}
            if mine:
                state.update(stack.enter_context(engine.gathered(mine, keep)))
        if keep:
            plain = {name: t for name, t in tensors.items() if name not in state}
            state.update({name: _host_copy(t) if on_host else t.detach() for name, t in plain.items()})
            state = {name: state[name] for name in tensors}
        yield state


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    # Read in place on CPU (training is paused during the save); copied off an accelerator.
    return tensor.detach() if tensor.device.type == "cpu" else tensor.detach().to("cpu", copy=True)


def shard_of(tensor: torch.Tensor) -> tuple[Engine, torch.Tensor, Any] | None:
    """Local: (engine, this rank's part, spec) of a sharded tensor, or None for a plain one or one whose engine
    cannot rebuild it from parts."""
    engine = engine_of(tensor)
    found = engine.shard_of(tensor) if engine is not None else None
    return (engine, *found) if engine is not None and found is not None else None


def gather_parts(part: torch.Tensor, group: Any, dst: int | None) -> list[torch.Tensor] | None:
    """Collective over `group`: every rank's `part` (all the same shape) in rank order, on `dst` (every rank when
    None); None elsewhere."""
    import torch.distributed as dist

    ranks = dist.get_world_size(group)
    if dst is None:
        parts = [torch.empty_like(part) for _ in range(ranks)]
        dist.all_gather(parts, part, group=group)
        return parts
    received = [torch.empty_like(part) for _ in range(ranks)] if dist.get_rank() == dst else None
    dist.gather(part, gather_list=received, dst=dst, group=group)
    return received


def check_engine(model: nn.Module | None) -> None:
    """Local: raise ValueError naming the fix when the model is (or will be) sharded in a way no engine here
    gathers. Before training only the Trainer's configuration is known; at `on_train_begin`, the sharded model."""
    state = _accelerator_state()
    for engine in ENGINES:
        problem = engine.unsupported(state, model)
        if problem:
            raise ValueError(f"CheckpointCallback cannot save this model: {problem}")


def trainer_checkpoint_warnings(args: Any) -> list[str]:
    """Warnings for Trainer settings that make its own checkpoints gather the whole model on one rank."""
    state = _accelerator_state()
    return [warning for engine in ENGINES if (warning := engine.trainer_checkpoint_warning(args, state))]


def _accelerator_state() -> Any:
    """accelerate's process-wide AcceleratorState (the Trainer's, from TrainingArguments or `accelerate
    launch --config_file`), or None before any Accelerator was created."""
    from accelerate.state import AcceleratorState

    return AcceleratorState() if AcceleratorState._shared_state else None
