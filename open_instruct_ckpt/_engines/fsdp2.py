"""torch FSDP2 (`fully_shard`, what accelerate sets up for `fsdp_version: 2`) behind the engine seam.

Every rank holds dim-0 shards of each parameter, as a `DTensor` whose `shape` is the full shape.
`fully_shard` also swaps each wrapped module's class for a generated `FSDP<Name>` subclass, so
class names are read past it (`original_class`). FSDP1 and tensor-parallel layouts are refused
before training, with the fix, instead of failing at the first save.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard

_FSDP1_FIX = (
    "FSDP1 keeps flattened parameters that cannot be gathered module by module; use FSDP2: "
    "TrainingArguments(fsdp=True, fsdp_config={'version': 2, ...}) or `fsdp_version: 2` in the accelerate config"
)
_TP_FIX = (
    "tensor-parallel weights are not gathered by this callback; train with tp_size=1 and let FSDP2 "
    "(fsdp_version: 2) or DeepSpeed ZeRO-3 shard the model"
)


class FSDP2:
    """Parameters sharded on dim 0 by torch FSDP2 (DTensors)."""

    name = "fsdp2"

    def owns(self, tensor: torch.Tensor) -> bool:
        return isinstance(tensor, DTensor)

    def full_shape(self, tensor: torch.Tensor) -> torch.Size:
        return tensor.shape  # a DTensor's shape is the global one

    @contextlib.contextmanager
    def gathered(self, tensors: dict[str, torch.Tensor], keep: bool) -> Iterator[dict[str, torch.Tensor]]:
        """Collective: every rank must pass the same tensors in the same order.

        Yields full CPU copies when `keep`, else nothing (each full tensor is dropped once gathered).
        """
        full: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, tensor in tensors.items():
                whole = _full_tensor(tensor)
                if keep:
                    full[name] = whole.to("cpu")  # all-gathered into new memory: no copy when already on cpu
        yield full

    def settle(self, model: nn.Module) -> None:
        """Local: put back the sharded parameters that a forward without a backward left unsharded.

        An evaluation forward leaves the root and the tail (`reshard_after_forward=False`) holding
        unsharded parameters, in the compute dtype under mixed precision; the Trainer does the same
        before it builds its optimizer.
        """
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def original_class(self, module: nn.Module) -> type | None:
        """The module's own class: `LlamaForCausalLM` for the `FSDPLlamaForCausalLM` that fully_shard made."""
        if not isinstance(module, FSDPModule):
            return None
        return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))

    def unsupported(self, state: Any, model: nn.Module | None) -> str | None:
        """Local: why this FSDP or DTensor set-up cannot be saved (and how to fix it), or None.

        `state` is accelerate's `AcceleratorState` (None before any Accelerator exists).
        """
        fsdp = getattr(state, "fsdp_plugin", None)
        if fsdp is not None and getattr(fsdp, "fsdp_version", 1) != 2:
            return f"fsdp_version={fsdp.fsdp_version}: {_FSDP1_FIX}"
        parallelism = getattr(state, "parallelism_config", None)
        if parallelism is not None and getattr(parallelism, "tp_enabled", False):
            return f"parallelism_config.tp_size={parallelism.tp_size}: {_TP_FIX}"
        return _model_problem(model) if model is not None else None

    def trainer_checkpoint_warning(self, args: Any, state: Any) -> str | None:
        """A warning when the Trainer's own FSDP checkpoint would gather the whole model on rank 0."""
        fsdp = getattr(state, "fsdp_plugin", None)
        if fsdp is None or "FULL_STATE_DICT" not in str(getattr(fsdp, "state_dict_type", "")):
            return None
        return (
            "FSDP state_dict_type FULL_STATE_DICT makes the Trainer gather the whole model on rank 0 for its own "
            "checkpoints; set fsdp_config={'state_dict_type': 'SHARDED_STATE_DICT'} (accelerate config: "
            "fsdp_state_dict_type: SHARDED_STATE_DICT): the Trainer then writes sharded, resumable state from every "
            "rank and this callback writes the HF weights"
        )

    def shard_of(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any] | None:
        """This rank's rows (FSDP2 shards dim 0 as `torch.chunk` does: ceil(n / ranks) rows each, the last ranks
        fewer or none), when the tensor is sharded over a 1-D mesh of every rank in rank order."""
        import torch.distributed as dist

        assert isinstance(tensor, DTensor)
        mesh = tensor.device_mesh
        if mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
            return None
        if mesh.mesh.flatten().tolist() != list(range(dist.get_world_size())):
            return None
        return tensor.to_local().detach(), (tuple(tensor.shape), mesh.size())

    def whole(self, part: torch.Tensor, spec: Any, group: Any, dst: int | None) -> torch.Tensor | None:
        from . import gather_parts

        shape, ranks = spec
        rows = -(-shape[0] // ranks)  # every rank's part padded to the same number of rows
        padded = part.new_zeros((rows, *shape[1:]))
        padded[: part.shape[0]] = part
        parts = gather_parts(padded, group, dst)
        return None if parts is None else torch.cat(parts)[: shape[0]]


ENGINE = FSDP2()


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    assert isinstance(tensor, DTensor)
    if tensor.device.type != tensor.device_mesh.device_type:  # offloaded shard: gather where the mesh talks
        moved = tensor.to(tensor.device_mesh.device_type)
        assert isinstance(moved, DTensor)
        tensor = moved
    return tensor.full_tensor()


def _model_problem(model: nn.Module) -> str | None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    for prefix, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel):
            return f"{prefix or 'the model'} is wrapped in FullyShardedDataParallel (FSDP1): {_FSDP1_FIX}"
        tp_size = getattr(module, "_tp_size", None)
        if getattr(module, "is_distributed_loading_by_transformers", False) and (tp_size or 1) > 1:
            return f"{prefix or 'the model'} was loaded with tp_size={tp_size}: {_TP_FIX}"
        for name, param in module.named_parameters(prefix=prefix, recurse=False):
            if isinstance(param, DTensor) and not _fsdp2_layout(module, param):
                return (
                    f"parameter {name} is a DTensor with placements {tuple(param.placements)} that FSDP2 did not "
                    f"make (FSDP2 shards dim 0 of fully_shard-ed modules): {_TP_FIX}"
                )
    return None


def _fsdp2_layout(owner: nn.Module, param: DTensor) -> bool:
    # FSDP: (Shard(0),); HSDP: (Replicate(), Shard(0)). Tensor parallelism shards other dims, strides
    # its shards (_StridedShard, a Shard subclass) or adds mesh dims, on modules FSDP does not manage.
    *outer, last = param.placements
    fsdp_shard = type(last) is Shard and last.dim == 0
    replicated = all(type(p) is Replicate for p in outer)
    return getattr(owner, "_is_fsdp_managed_module", False) and fsdp_shard and replicated


