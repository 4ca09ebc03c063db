"""Plan safetensors files from stored shapes, without touching tensor data.

`pretrained_weights` is what `PreTrainedModel.save_pretrained` would write for the same module and
`max_shard_size` (same tied-weight removal, same reverted weight names, same `weight_map`), computed
from stored shapes so it needs no gather (ZeRO-3 or FSDP2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from torch import nn
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import PrefixChange, revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from .._engines import Group, meta_like, own_state, stored_numel
from .plan import Layout, Transform, Weights, arrival_order

WEIGHTS_PATTERN = "model{suffix}.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "50GB"


def pretrained_weights(module: nn.Module, max_shard_size: int | str | None) -> Weights:
    """Collective-free: the files `save_pretrained` would write for `module`'s state dict, and the gather order."""
    tensors = saved_tensors(module)
    revert = name_reverter(module)
    final_meta = revert({name: meta_like(t) for name, t in tensors.items()})
    groups = groups_in_file_order(module, tensors, list(final_meta), revert)
    total_parameters = sum(stored_numel(p) for p in module.parameters())
    layout = split_layout(final_meta, arrival_order(groups, revert), max_shard_size, total_parameters)
    return Weights(groups, layout, revert)


def split_layout(final_meta: dict[str, torch.Tensor], arrival: dict[str, torch.Tensor],
                 max_shard_size: int | str | None, total_parameters: int) -> Layout:
    """The files `save_pretrained` would write for `final_meta` (its state-dict order decides which file holds what,
    as in `save_pretrained`); within each file, tensors in `arrival` order, so each file streams front to back."""
    split = split_torch_state_dict_into_shards(
        final_meta, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE
    )
    file_of = {name: file for file, names in split.filename_to_tensors.items() for name in names}
    if set(arrival) != set(file_of):
        raise RuntimeError(f"the gather delivers {sorted(set(arrival) ^ set(file_of))[:3]} unlike the plan")
    files: dict[str, list[str]] = {file: [] for file in split.filename_to_tensors}
    for name in arrival:
        files[file_of[name]].append(name)
    return Layout(
        files=files, planned={name: (t.dtype, tuple(t.shape)) for name, t in final_meta.items()},
        index_name=INDEX_NAME if split.is_sharded else None,
        index_metadata={"total_parameters": total_parameters, **split.metadata},
    )


def saved_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors that `save_pretrained` would write, tied duplicates removed."""
    state = dict(module.state_dict(keep_vars=True))
    for key in getattr(module, "_keys_to_ignore_on_save", None) or []:
        state.pop(key, None)
    kept = untied_names(module, state)
    return {name: t for name, t in state.items() if name in kept}


def untied_names(module: nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    """The names `save_pretrained` keeps of tensors that share one object (tied weights)."""
    # One small proxy per object stands in for the (possibly partitioned) data, so transformers' own tie
    # logic decides which name stays.
    proxies: dict[int, torch.Tensor] = {}
    by_name = {name: proxies.setdefault(id(t), torch.zeros(1)) for name, t in state.items()}
    if isinstance(module, PreTrainedModel):
        return set(remove_tied_weights_from_state_dict(by_name, module))
    first_name: dict[int, str] = {}
    for name, t in state.items():
        first_name.setdefault(id(t), name)
    return set(first_name.values())


def name_reverter(module: nn.Module) -> Transform:
    """Undo transformers' load-time weight conversions, as `save_pretrained` does; identity when there are none.

    Decided once per plan: looking the conversions up walks the whole model every time.
    """
    if isinstance(module, PreTrainedModel) and _has_weight_conversions(module):
        return lambda state: revert_weight_conversion(module, state)
    return lambda state: state


def _has_weight_conversions(model: PreTrainedModel) -> bool:
    # The same test `revert_weight_conversion` makes before returning its input unchanged. A model
    # from `from_pretrained` carries its list even when empty, and then the revert re-sorts the keys,
    # which moves tensors between shard files.
    if getattr(model, "_weight_conversions", None) is not None:
        return True
    conversions = get_model_conversion_mapping(model, add_legacy=False)
    return any(not isinstance(c, PrefixChange) for c in conversions)


def groups_in_file_order(module: nn.Module, tensors: dict[str, torch.Tensor], final_order: list[str],
                         revert: Callable) -> list[Group]:
    """One group per module (its own tensors), ordered by where their saved tensors first appear in the state dict."""
    position = {name: i for i, name in enumerate(final_order)}
    groups = []
    for prefix, child in module.named_modules(remove_duplicate=False):
        own = {n: t for n, t in own_state(child, f"{prefix}." if prefix else "").items() if n in tensors}
        if own:
            final_names = revert({n: meta_like(t) for n, t in own.items()})
            groups.append((min(position[n] for n in final_names), child, own))
    groups.sort(key=lambda g: g[0])
    return [(child, own) for _, child, own in _unique(groups)]


def _unique(groups: list) -> list:
    seen: set[str] = set()
    unique = []
    for position, child, own in groups:
        fresh = {n: t for n, t in own.items() if n not in seen}
        seen.update(fresh)
        if fresh:
            unique.append((position, child, fresh))
    return unique
