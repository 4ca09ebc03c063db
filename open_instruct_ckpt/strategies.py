"""What a checkpoint holds: `FullModel`, `LoRAAdapter`, `ModelAttribute`, each as a write plan.

A strategy says what, never how: `plan(model)` returns the tensor groups to gather (through the engine
seam), how gathered tensors become saved ones, the files they go to and the small files beside them;
`_write` carries every plan out the same way (hashed, measured, atomic). Plans are built on every rank
from stored shapes, without a gather, and must come out identical on every rank.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from huggingface_hub.serialization._base import parse_size_to_int
from torch import nn
from transformers import PreTrainedModel

from ._dist import WRITERS
from ._engines import settle
from ._write.adapter import adapter_plan
from ._write.configs import model_config
from ._write.layout import pretrained_weights
from ._write.merge import MERGED_DIR, check_mergeable, merged_config, merged_plan
from ._write.plan import WritePlan


@runtime_checkable
class CheckpointStrategy(Protocol):
    def check(self, model: nn.Module) -> None:
        """Raise a clear error if this strategy cannot save `model`. Local, no collectives."""

    def saved_module(self, model: nn.Module) -> nn.Module:
        """The module whose config, vocabulary and generation config the checkpoint carries."""

    def plan(self, model: nn.Module, final: bool = False) -> WritePlan:
        """Local, the same on every rank: what a save of `model` writes (`final`: the save at train end)."""


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _check_shard_size(owner: str, value: object) -> None:
    """Parse `max_shard_size` as `save_pretrained` does (huggingface_hub's parser), at construction."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{owner}(max_shard_size={value!r}): use an int of bytes or a size like '5GB'")
    try:
        size = value if isinstance(value, int) else parse_size_to_int(value)
    except ValueError as exc:
        raise ValueError(f"{owner}(max_shard_size={value!r}): {exc}; use a size like '5GB' or '500MB'") from None
    if size <= 0:
        raise ValueError(f"{owner}(max_shard_size={value!r}): must be positive, e.g. '5GB'")


@dataclass(frozen=True)
class FullModel:
    """The whole model in safetensors, loadable with `from_pretrained` of its class.

    `writers` is deprecated here: how a checkpoint is written is the callback's, `CheckpointCallback(...,
    writers="all")`.
    """

    max_shard_size: int | str | None = None
    writers: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_shard_size("FullModel", self.max_shard_size)
        if self.writers is None:
            return
        if self.writers not in WRITERS:
            raise ValueError(f"FullModel(writers={self.writers!r}): use 'main' (rank 0 writes) or 'all' (every rank "
                             "writes its share of the shard files; needs an output_dir shared by all ranks)")
        warnings.warn(f"FullModel(writers={self.writers!r}) is deprecated: pass CheckpointCallback(..., "
                      f"writers={self.writers!r}); how a checkpoint is written is the callback's option",
                      DeprecationWarning, stacklevel=3)

    def check(self, model: nn.Module) -> None:
        if _is_peft(model):
            raise TypeError(
                "FullModel got a PEFT model; use LoRAAdapter() to save the adapter, or save "
                "model.merge_and_unload() if you want merged full weights"
            )
        if not isinstance(model, PreTrainedModel):
            raise TypeError(
                f"FullModel needs a transformers PreTrainedModel, got {type(model).__name__}; for one "
                "submodule of a composite model use ModelAttribute('<attribute name>')"
            )

    def saved_module(self, model: nn.Module) -> nn.Module:
        return model

    def plan(self, model: nn.Module, final: bool = False) -> WritePlan:
        self.check(model)
        settle(model)
        return WritePlan(pretrained_weights(model, self.max_shard_size), tuple(model_config(model)),
                         generation_module=model)


@dataclass(frozen=True)
class ModelAttribute:
    """One submodule of a composite model (e.g. `"policy"` of a PPO policy+value wrapper), saved on its own.

    Keys are those under `<name>.`, with that prefix stripped; a `PreTrainedModel` submodule loads
    with its class's `from_pretrained`, any other module from the plain `model.safetensors`.
    """

    name: str
    max_shard_size: int | str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ModelAttribute({self.name!r}): give the attribute name, e.g. ModelAttribute('policy')")
        if "/" in self.name or "\\" in self.name or ".." in self.name or not all(self.name.split(".")):
            raise ValueError(
                f"ModelAttribute({self.name!r}): an attribute path is dot-separated Python names "
                "(e.g. 'policy' or 'actor.model'), without path separators, '..' or empty parts"
            )
        _check_shard_size("ModelAttribute", self.max_shard_size)

    def check(self, model: nn.Module) -> None:
        self.saved_module(model)

    def saved_module(self, model: nn.Module) -> nn.Module:
        try:
            module = operator.attrgetter(self.name)(model)
        except AttributeError:
            children = ", ".join(n for n, _ in model.named_children()) or "none"
            raise ValueError(
                f"ModelAttribute({self.name!r}): {type(model).__name__} has no attribute {self.name!r} "
                f"(its submodules: {children}); pass the name of the submodule to save"
            ) from None
        if not isinstance(module, nn.Module):
            raise TypeError(f"ModelAttribute({self.name!r}) is a {type(module).__name__}, not a torch.nn.Module")
        return module

    def plan(self, model: nn.Module, final: bool = False) -> WritePlan:
        module = self.saved_module(model)
        settle(model)
        generative = module if isinstance(module, PreTrainedModel) else None
        return WritePlan(pretrained_weights(module, self.max_shard_size), tuple(model_config(module)),
                         generation_module=generative)


@dataclass(frozen=True)
class LoRAAdapter:
    """A PEFT model's adapter only, in PEFT's format, loadable with `PeftModel.from_pretrained(base, dir)`.

    Every trainable parameter is saved (so `modules_to_save` works). `save_embedding_layers=None`
    saves the full embedding layers when they are targeted, or resized relative to a local base
    model directory; pass True for a vocabulary resized without a local base to compare with.
    `merged_final=True` also writes, at the final save only, the merged full model into `final/merged/`
    (loadable without PEFT).
    """

    save_embedding_layers: bool | None = None
    merged_final: bool = False

    def __post_init__(self) -> None:
        if self.save_embedding_layers not in (None, True, False):
            raise TypeError(f"LoRAAdapter(save_embedding_layers={self.save_embedding_layers!r}): use None, True or False")
        if not isinstance(self.merged_final, bool):
            raise TypeError(f"LoRAAdapter(merged_final={self.merged_final!r}): use True or False")

    def check(self, model: nn.Module) -> None:
        if not _is_peft(model):
            raise TypeError(
                f"LoRAAdapter needs a peft.PeftModel, got {type(model).__name__}; wrap the model with "
                "peft.get_peft_model(model, LoraConfig(...)) or use FullModel() to save all weights"
            )
        if self.merged_final:
            check_mergeable(model)

    def saved_module(self, model: Any) -> nn.Module:  # a peft.PeftModel (peft is imported lazily: typed Any)
        return model.get_base_model()

    def plan(self, model: Any, final: bool = False) -> WritePlan:
        self.check(model)
        settle(model)
        adapter = adapter_plan(model, self.save_embedding_layers)
        if not (final and self.merged_final):
            return adapter
        merged = merged_plan(model, model_config(model.get_base_model(), merged_config(model)))
        return WritePlan(adapter.weights, adapter.small_files, {MERGED_DIR: merged}, adapter.generation_module)


def check_strategy(strategy: Any) -> None:
    if isinstance(strategy, type):
        raise TypeError(f"CheckpointCallback got the class {strategy.__name__}; pass an instance: {strategy.__name__}()")
    if not isinstance(strategy, CheckpointStrategy):
        raise TypeError(
            f"CheckpointCallback strategy={strategy!r} is not a save strategy; pass FullModel(), "
            "LoRAAdapter() or ModelAttribute('<name>')"
        )


def writers_of(strategy: CheckpointStrategy, writers: str) -> str:
    """The callback's `writers`, or the deprecated `FullModel(writers=...)` (warned when it was built)."""
    old = strategy.writers if isinstance(strategy, FullModel) else None
    if old is not None and writers != "main" and old != writers:
        raise ValueError(f"FullModel(writers={old!r}) and CheckpointCallback(writers={writers!r}) disagree; pass only "
                         "CheckpointCallback(writers=...)")
    return old if old is not None else writers
