"""DeepSpeed ZeRO-3 awareness: the only module that imports deepspeed, and only lazily.

Under ZeRO stage 3 every rank holds a slice of each parameter (`param.numel() == 0`, the real
shape in `param.ds_shape`). Reading such a parameter without gathering it first is how empty
checkpoints get written, so every strategy reads parameters through `for_each_module_state`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

ModuleState = dict[str, torch.Tensor]


def is_partitioned(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def stored_shape(tensor: torch.Tensor) -> torch.Size:
    """The full shape of a tensor, partitioned or not; needs no gather."""
    return tensor.ds_shape if is_partitioned(tensor) else tensor.shape


def stored_numel(tensor: torch.Tensor) -> int:
    return stored_shape(tensor).numel()


def stored_nbytes(tensor: torch.Tensor) -> int:
    return stored_numel(tensor) * tensor.element_size()


def any_partitioned(module: nn.Module) -> bool:
    return any(is_partitioned(p) for p in module.parameters())


@contextlib.contextmanager
def _gathered(params: Sequence[nn.Parameter]) -> Iterator[None]:
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    # Collective: every rank must enter with the same parameters in the same order.
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def own_state(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The module's own parameters and persistent buffers (not its children's), keyed by full name."""
    state: dict[str, torch.Tensor] = {f"{prefix}{n}": p for n, p in module.named_parameters(recurse=False)}
    skipped = getattr(module, "_non_persistent_buffers_set", set())
    for name, buffer in module.named_buffers(recurse=False):
        if buffer is not None and name not in skipped:
            state[f"{prefix}{name}"] = buffer
    return state


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    # A gathered parameter's storage is released when the gather ends: copy it out. Others are
    # read in place (training is paused during the save).
    if is_partitioned(tensor) or tensor.device.type != "cpu":
        return tensor.detach().to("cpu", copy=True)
    return tensor.detach()


def for_each_module_state(
    groups: Sequence[tuple[nn.Module, dict[str, torch.Tensor]]],
    consume: Callable[[ModuleState], Any] | None,
) -> None:
    """Collective: gather each group's tensors in turn and hand them to `consume` on the writer.

    `groups` is `(module, {full_name: tensor})` pairs, identical and identically ordered on every
    rank. Non-writers pass `consume=None` and keep nothing. If `consume` raises, the writer still
    enters every remaining gather (so the other ranks do not hang) and re-raises afterwards.
    """
    failure: BaseException | None = None
    for _module, tensors in groups:
        params = [t for t in tensors.values() if isinstance(t, nn.Parameter)]
        with _gathered(params):
            if consume is None or failure is not None:
                continue
            try:
                consume({name: _host_copy(t) for name, t in tensors.items()})
            except Exception as exc:  # re-raised below, after the last collective
                failure = exc
    if failure is not None:
        raise failure


def trainer_gathers_full_model(args: Any) -> bool:
    """Whether the Trainer's own checkpoint would gather all 16-bit weights on one rank."""
    config = getattr(args, "hf_deepspeed_config", None)
    if config is None or not config.is_zero3():
        return False
    return bool(config.get_value("zero_optimization.stage3_gather_16bit_weights_on_model_save", False))
