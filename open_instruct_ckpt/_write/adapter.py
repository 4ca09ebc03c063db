"""A PEFT adapter as a write plan: PEFT's own state-dict conversion and config files, through our writer.

The gathered tensors are every trainable parameter (so `modules_to_save` works), plus the embedding layers
when they are saved; `get_peft_model_state_dict` turns them into the adapter's keys once all are in (an
adapter is small), and the same `ShardWriter` writes `adapter_model.safetensors`. `adapter_config.json`
and the model card are written as `PeftModel.save_pretrained` writes them, without changing the live model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._engines import Group, meta_like, own_state
from .plan import Layout, SmallFile, Weights, WritePlan

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_plan(model: Any, save_embedding_layers: bool | None) -> WritePlan:
    """Collective-free: the plan of a PEFT model's adapter checkpoint."""
    embeddings = embeddings_saved(model, save_embedding_layers)
    groups = _groups(model, embeddings)
    tensors = {name: t for _, own in groups for name, t in own.items()}

    def finish(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(model, state_dict=state, adapter_name=model.active_adapter,
                                         save_embedding_layers=embeddings)

    saved = finish({name: meta_like(t) for name, t in tensors.items()})
    layout = Layout({ADAPTER_WEIGHTS: list(saved)}, {name: (t.dtype, tuple(t.shape)) for name, t in saved.items()})
    files = (SmallFile("adapter_config.json", _config_writer(model)),
             SmallFile("README.md", lambda directory: model.create_or_update_model_card(str(directory))))
    return WritePlan(Weights(groups, layout, finish=finish), files, generation_module=model.get_base_model())


def _groups(model: nn.Module, embeddings: bool) -> list[Group]:
    wanted = {id(p) for p in model.parameters() if p.requires_grad}
    if embeddings:
        wanted |= {id(p) for layer in _embedding_layers(model) for p in layer.parameters()}
    groups = []
    for prefix, module in model.named_modules():
        own = {n: t for n, t in own_state(module, f"{prefix}." if prefix else "").items() if id(t) in wanted}
        if own:
            groups.append((module, own))
    return groups


def _config_writer(model: Any):
    """`adapter_config.json` as PeftModel.save_pretrained writes it, from a copy taken now (the live config stays)."""
    config = copy.deepcopy(model.peft_config[model.active_adapter])
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = model.base_model.model.__dict__.get("name_or_path", None) or None
    config.inference_mode = True
    auto_mapping = None
    if config.task_type is None:
        base_class = model._get_base_model_class(is_prompt_tuning=config.is_prompt_learning)
        auto_mapping = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
    return lambda directory: config.save_pretrained(str(directory), auto_mapping_dict=auto_mapping)


def embeddings_saved(model: Any, save_embedding_layers: bool | None) -> bool:
    """Whether the full embedding layers go into the adapter: asked for, targeted, or resized against a local base."""
    if save_embedding_layers is not None:
        return save_embedding_layers
    return _embeddings_targeted(model) or _embeddings_resized(model)


def _embedding_layers(model: Any) -> list[nn.Module]:
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    return [layer for layer in layers if layer is not None]


def _embeddings_targeted(model: Any) -> bool:
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    config = model.peft_config[model.active_adapter]
    targets = config.target_modules or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    return any(name in targets for name in EMBEDDING_LAYER_NAMES)


def _embeddings_resized(model: Any) -> bool:
    config = model.peft_config[model.active_adapter]
    base_config = Path(config.base_model_name_or_path or "") / "config.json"
    if not config.base_model_name_or_path or not base_config.is_file():
        return False
    base_vocab = json.loads(base_config.read_text()).get("vocab_size")
    return base_vocab is not None and base_vocab != model.get_input_embeddings().num_embeddings
