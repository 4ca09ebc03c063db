"""Merged LoRA for serving, as a write plan: the base model with every LoRA layer's `W + scaling * B @ A`.

A transform in the plan, not a second writer: the groups come from the live PEFT model (a LoRA layer's
`base_layer` tensors together with its `lora_A`/`lora_B`), each gathered group is merged into new tensors
(fp32, cast back to the base dtype) under the plain model's names, and the executor writes the files as
`save_pretrained` lays them out. The training model is only read, never merged in place.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._engines import Group, meta_like, model_class, own_state, stored_numel
from .layout import DEFAULT_MAX_SHARD_SIZE, name_reverter, split_layout, untied_names
from .plan import SmallFile, Weights, WritePlan, arrival_order

MERGED_DIR = "merged"
_FIX = "set merged_final=False and, after training, save model.merge_and_unload() yourself"


def merged_plan(model: Any, configs: list[SmallFile]) -> WritePlan:
    """Collective-free: `merged/`, the merged model as `save_pretrained` would write it (configs untied where needed)."""
    base = model.get_base_model()
    return WritePlan(merged_weights(model), tuple(configs), generation_module=base, tokenizer=True, final_only=True)


def merged_config(model: Any) -> Any:
    """The base model's config for `merged/`: untied when a merged weight was tied (LoRA on a tied lm_head)."""
    config = copy.deepcopy(model.get_base_model().config)
    if unties_embeddings(model):
        for each in {id(c): c for c in (config, config.get_text_config())}.values():
            each.tie_word_embeddings = False
    return config


# -- the plan, from stored shapes --------------------------------------------------------------

@dataclass(frozen=True)
class _Factors:
    """One LoRA layer's merge: the names of its gathered factors and how to combine them."""

    lora_a: str
    lora_b: str
    scaling: float
    fan_in_fan_out: bool

    def apply(self, weight: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        # New tensors only: on CPU the gathered `weight` is the live parameter itself.
        delta = (state[self.lora_b].float() @ state[self.lora_a].float()) * self.scaling
        if self.fan_in_fan_out:
            delta = delta.T
        return (weight.float() + delta).to(weight.dtype)


def merged_weights(model: Any) -> Weights:
    """Local, no gather: the merged model's files (groups hold live names) and the per-group merge."""
    base = model.get_base_model()
    layers = _lora_layers(base)
    state = dict(base.state_dict(keep_vars=True))
    for key in getattr(base, "_keys_to_ignore_on_save", None) or []:
        state.pop(key, None)
    rename = {name: merged for name in state if (merged := _merged_name(name, layers)) is not None}
    factors = {f"{p}.base_layer.weight": _factors(p, layer, model.active_adapter) for p, layer in layers.items()}
    # A merged weight is a new tensor: tied to nothing, even where its base weight was (LoRA on a tied lm_head).
    kept = untied_names(base, {merged: torch.empty(0) if name in factors else state[name]
                                for name, merged in rename.items()})
    rename = {name: merged for name, merged in rename.items() if merged in kept}
    lora_ids = {id(t) for name, t in state.items() if name not in rename and _merged_name(name, layers) is None}
    revert = name_reverter(base)
    final_meta = revert({merged: meta_like(state[name]) for name, merged in rename.items()})
    groups = _groups(base, layers, state, rename, factors)

    def merge(gathered: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, tensor in gathered.items():
            if name in rename:
                out[rename[name]] = factors[name].apply(tensor, gathered) if name in factors else tensor
        return out

    def transform(gathered: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return revert(merge(gathered))

    total_parameters = sum(stored_numel(p) for p in base.parameters() if id(p) not in lora_ids)
    layout = split_layout(final_meta, arrival_order(groups, transform), DEFAULT_MAX_SHARD_SIZE, total_parameters)
    return Weights(groups, layout, transform)


def _merged_name(name: str, layers: dict[str, Any]) -> str | None:
    """`...q_proj.base_layer.weight` -> `...q_proj.weight`; None for a LoRA factor (`...q_proj.lora_A.default.weight`)."""
    for prefix in layers:
        if name.startswith(f"{prefix}.base_layer."):
            return f"{prefix}.{name[len(prefix) + len('.base_layer.'):]}"
        if name.startswith(f"{prefix}."):
            return None
    return name


def _factors(prefix: str, layer: Any, adapter: str) -> _Factors:
    return _Factors(f"{prefix}.lora_A.{adapter}.weight", f"{prefix}.lora_B.{adapter}.weight",
                    float(layer.scaling[adapter]), bool(layer.fan_in_fan_out))


def _groups(base: nn.Module, layers: dict[str, Any], state: dict[str, torch.Tensor],
            rename: dict[str, str], factors: dict[str, _Factors]) -> list[Group]:
    """One group per LoRA layer (base tensors + its factors), one per other module; each name once, in module (state dict) order."""
    groups, seen = [], set[str]()
    for prefix, module in base.named_modules(remove_duplicate=False):
        if any(prefix.startswith(f"{p}.") for p in layers):
            continue
        own = own_state(module, f"{prefix}." if prefix else "")
        if prefix in layers:
            own = {n: state[n] for n in state if n.startswith(f"{prefix}.base_layer.")}
            weight = factors[f"{prefix}.base_layer.weight"]
            own.update({weight.lora_a: state[weight.lora_a], weight.lora_b: state[weight.lora_b]})
        fresh = {n: t for n, t in own.items() if n not in seen and (n in rename or prefix in layers)}
        seen.update(fresh)
        if fresh:
            groups.append((module, fresh))
    return groups


def unties_embeddings(model: Any) -> bool:
    """Local: whether a LoRA layer's base weight is tied to another weight (LoRA on a tied `lm_head`): merged, the
    two differ, so the merged model is saved untied (`tie_word_embeddings=False`), as the trained model computes."""
    base = model.get_base_model()
    layers = _lora_layers(base)
    state = dict(base.state_dict(keep_vars=True))
    merged_ids = {id(state[f"{prefix}.base_layer.weight"]) for prefix in layers if f"{prefix}.base_layer.weight" in state}
    owners: dict[int, int] = {}
    for tensor in state.values():
        owners[id(tensor)] = owners.get(id(tensor), 0) + 1
    return any(owners[tensor_id] > 1 for tensor_id in merged_ids)


# -- what can be merged ------------------------------------------------------------------------

def _lora_layers(base: nn.Module) -> dict[str, Any]:  # peft's BaseTunerLayer modules
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: module for name, module in base.named_modules() if isinstance(module, BaseTunerLayer)}


def check_mergeable(model: Any) -> None:
    """Local: raise ValueError naming the fix when the live PEFT model is not plain LoRA on linear layers."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    if len(model.peft_config) != 1:
        _refuse(f"{len(model.peft_config)} adapters ({', '.join(model.peft_config)}); it merges exactly one")
    config = model.peft_config[model.active_adapter]
    if str(config.peft_type) not in ("LORA", "PeftType.LORA"):
        _refuse(f"a {config.peft_type} adapter; it merges LoRA only")
    for option in ("modules_to_save", "trainable_token_indices", "layer_replication", "target_parameters"):
        if getattr(config, option, None):
            _refuse(f"LoraConfig({option}={getattr(config, option)!r})")
    for name, module in _lora_layers(model.get_base_model()).items():
        _check_layer(name, module)
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            _refuse(f"{name} is a {type(module).__name__} (modules_to_save or trainable tokens)")


def _check_layer(name: str, module: Any) -> None:
    from peft.tuners.lora.layer import Linear as LoraLinear

    if model_class(module) is not LoraLinear or model_class(module.get_base_layer()) not in (nn.Linear, Conv1D):
        _refuse(f"{name} is a {type(module).__name__} over {type(module.get_base_layer()).__name__} "
                "(only LoRA on torch Linear layers merges here, not embeddings, convolutions or quantized layers)")
    if module.lora_variant:
        _refuse(f"{name} uses a LoRA variant such as DoRA ({', '.join(sorted(module.lora_variant))})")
    if any(module.lora_bias.values()):
        _refuse(f"{name} uses lora_bias")
    if module.merged:
        _refuse(f"{name} has its adapter merged into the base weights already")


def _refuse(reason: str) -> None:
    raise ValueError(f"LoRAAdapter(merged_final=True) cannot merge this model: {reason}; {_FIX}")
