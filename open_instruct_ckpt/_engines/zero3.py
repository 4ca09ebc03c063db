"""DeepSpeed ZeRO-3 behind the engine seam: the only module that imports deepspeed, and only lazily.

Under ZeRO stage 3 every rank holds a slice of each parameter (`param.numel() == 0`, the real
shape in `param.ds_shape`). Reading such a parameter without gathering it first is how empty
checkpoints get written, so the writer reads parameters through `_engines`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class ZeRO3:
    """Parameters partitioned by DeepSpeed ZeRO stage 3 (`ds_id`, `ds_shape`)."""

    name = "zero3"

    def owns(self, tensor: torch.Tensor) -> bool:
        return hasattr(tensor, "ds_id")

    def full_shape(self, tensor: torch.Tensor) -> torch.Size:
        return tensor.ds_shape

    @contextlib.contextmanager
    def gathered(self, tensors: dict[str, torch.Tensor], keep: bool) -> Iterator[dict[str, torch.Tensor]]:
        """Collective: every rank must pass the same parameters in the same order.

        Yields CPU copies when `keep` (DeepSpeed may reuse the gathered storage once the gather ends, and the
        writer's digest thread reads the bytes after the write), else nothing.
        """
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(tensors.values()), modifier_rank=None):
            yield {name: t.detach().to("cpu", copy=True) for name, t in tensors.items()} if keep else {}

    def settle(self, model: nn.Module) -> None:
        """Nothing to do: GatheredParameters copes with parameters a forward left gathered."""

    def unsupported(self, state: Any, model: nn.Module | None) -> str | None:
        return None

    def trainer_checkpoint_warning(self, args: Any, state: Any) -> str | None:
        """A warning when the Trainer's own checkpoint would gather all 16-bit weights on one rank.

        The DeepSpeed config comes from `TrainingArguments(deepspeed=...)` or, under
        `accelerate launch --config_file`, from accelerate's DeepSpeed plugin.
        """
        config = getattr(args, "hf_deepspeed_config", None)
        if config is None:
            config = getattr(getattr(state, "deepspeed_plugin", None), "hf_ds_config", None)
        if config is None or not config.is_zero3():
            return None
        if not config.get_value("zero_optimization.stage3_gather_16bit_weights_on_model_save", False):
            return None
        return (
            "stage3_gather_16bit_weights_on_model_save=true makes the Trainer gather the whole model on "
            "rank 0 for its own checkpoints; set it to false: the Trainer then writes sharded, resumable "
            "state from every rank and this callback writes the HF weights"
        )

    def original_class(self, module: nn.Module) -> type | None:
        return None

    def shard_of(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any] | None:
        """This rank's flat partition (`ds_tensor`, padded to the same size on every rank), when the partitions span
        every rank in rank order; the full tensor is their concatenation, cut to `ds_numel`."""
        import torch.distributed as dist

        part = getattr(tensor, "ds_tensor", None)
        group = getattr(tensor, "ds_process_group", None)
        if part is None or part.numel() != getattr(part, "ds_numel", -1) or part.device.type == "meta":
            return None
        if dist.get_world_size(group) != dist.get_world_size() or dist.get_rank(group) != dist.get_rank():
            return None
        return part.detach(), (tensor.ds_numel, tuple(tensor.ds_shape))

    def whole(self, part: torch.Tensor, spec: Any, group: Any, dst: int | None) -> torch.Tensor | None:
        from . import gather_parts

        parts = gather_parts(part, group, dst)
        numel, shape = spec
        return None if parts is None else torch.cat(parts)[:numel].view(shape)


ENGINE = ZeRO3()

