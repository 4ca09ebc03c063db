"""Rank helpers: who writes, and how a writer's verdict or failure reaches every rank.

Every function here that takes part in a collective says so; in a distributed run all ranks
must call it at the same point, or the job hangs until the process-group timeout.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ._errors import CheckpointError

T = TypeVar("T")
WRITERS = ("main", "all")  # who writes a checkpoint's files: the Trainer's writer alone, or every rank its share


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _flag_device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """Collective: True on every rank when `flag` is True on at least one rank."""
    if not is_distributed():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_flag_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def from_rank_zero(value: T) -> T:
    """Collective: rank 0's `value` (any picklable object) on every rank; the others' values are ignored.

    Rank 0 always saves (`args.should_save`), so a decision or path the writer holds reaches every rank.
    """
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def raise_on_all_ranks(error: BaseException | None) -> None:
    """Collective: if any rank passes an error, every rank raises.

    The rank that failed re-raises its own exception; the others raise a `CheckpointError`
    carrying that rank's message, so the job stops with the real cause instead of hanging in
    the next collective.
    """
    if not any_rank(error is not None):
        return
    if is_distributed():
        messages: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    raise CheckpointError(_first_failure(messages))


def _first_failure(messages: list[str | None]) -> str:
    for source_rank, message in enumerate(messages):
        if message is not None:
            return f"checkpoint save failed on rank {source_rank}: {message}"
    return "checkpoint save failed on another rank"


def gather_to_all(value: object, group: Any = None) -> list:
    """Collective (over `group`, the default group when None): every rank's `value`, in rank order, on every rank."""
    if not is_distributed():
        return [value]
    values: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


_BACKGROUND: dict[int, Any] = {}  # id of the default group -> its background group


def background_group() -> Any:
    """Collective, at set-up: a gloo process group for collectives made by background saves, which run beside
    training's own collectives on the default group (in the same order on every rank). Made once per default
    group; every rank asks at the same point, so every rank makes it or none does."""
    if not is_distributed():
        return None
    world = id(dist.group.WORLD)
    if world not in _BACKGROUND:
        _BACKGROUND.clear()  # a default group destroyed since took its subgroups with it
        _BACKGROUND[world] = dist.new_group(backend="gloo")
    return _BACKGROUND[world]
