"""What to save: one class per kind of checkpoint.

Rank contract shared by every strategy: `save` is called on every rank (gathering a sharded model is
collective); `directory` is the writer's staging directory and None on every other rank,
which then only takes part in the gathers and keeps no state dict.

`snapshot(model, directory, generation_config, arena)` is the same gather for async saves: the
writer copies every tensor into `arena` (a true copy) and gets back `persist`, which writes the
files later from those copies; `save` is `snapshot` without an arena, writing while it gathers.
"""

from __future__ import annotations

import copy
import json
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from huggingface_hub.serialization._base import parse_size_to_int
from torch import nn
from transformers import GenerationConfig, PreTrainedModel

from ._gather import for_each_module_state, model_class, own_state, settle, stored_nbytes
from ._shards import ShardShare, ShardWriter, plan_shards, saved_bytes


@dataclass
class WriteReport:
    """What the writer learned while writing: peak CPU bytes held and checksums it computed."""

    peak_held_bytes: int = 0
    sha256: dict[str, str] = field(default_factory=dict)


Persist = Callable[[], WriteReport]  # writer: write the files a snapshot left to write


@runtime_checkable
class CheckpointStrategy(Protocol):
    def check(self, model: nn.Module) -> None:
        """Raise a clear error if this strategy cannot save `model`. Local, no collectives."""

    def saved_module(self, model: nn.Module) -> nn.Module:
        """The module whose config, vocabulary and generation config the checkpoint carries."""

    def estimate_bytes(self, model: nn.Module) -> int:
        """Bytes of weights a save writes, from stored shapes (no gather). Local."""

    def save(self, model: nn.Module, directory: Path | None, generation_config: GenerationConfig | None) -> WriteReport:
        """Collective. Write the checkpoint into `directory` on the writer (empty report elsewhere)."""

    def snapshot(self, model: nn.Module, directory: Path | None, generation_config: Any, arena: Any = None) -> Persist:
        """Collective. Gather (copying into `arena`, an async save's staging memory, when given); the returned
        `persist` writes what is left on the writer. `save` is `snapshot(...)()`."""


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


WRITERS = ("main", "all")


@dataclass(frozen=True)
class FullModel:
    """The whole model in safetensors, loadable with `from_pretrained` of its class.

    `writers="all"` (distributed runs): every rank writes distinct shard files of the same plan (file
    i by rank i mod world_size) into one staging directory, which must be on a filesystem shared by
    all ranks; rank 0 writes the index, configs, tokenizer and the manifest last. `"main"`: rank 0 only.
    """

    max_shard_size: int | str | None = None
    writers: str = field(default="main", repr=False)  # how it is written, not what: not in the manifest

    def __post_init__(self) -> None:
        _check_shard_size("FullModel", self.max_shard_size)
        if self.writers not in WRITERS:
            raise ValueError(f"FullModel(writers={self.writers!r}): use 'main' (rank 0 writes) or 'all' (every rank "
                             "writes its share of the shard files; needs an output_dir shared by all ranks)")

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

    def estimate_bytes(self, model: nn.Module) -> int:
        return saved_bytes(model)

    def save(self, model: nn.Module, directory: Path | None, generation_config: GenerationConfig | None) -> WriteReport:
        return self.snapshot(model, directory, generation_config)()

    def snapshot(self, model: nn.Module, directory: Path | None, generation_config: Any, arena: Any = None,
                 share: ShardShare | None = None) -> Persist:
        self.check(model)
        settle(model)
        return write_module(model, directory, generation_config, self.max_shard_size, arena, share)


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

    def estimate_bytes(self, model: nn.Module) -> int:
        return saved_bytes(self.saved_module(model))

    def save(self, model: nn.Module, directory: Path | None, generation_config: GenerationConfig | None) -> WriteReport:
        return self.snapshot(model, directory, generation_config)()

    def snapshot(self, model: nn.Module, directory: Path | None, generation_config: Any, arena: Any = None) -> Persist:
        settle(model)
        return write_module(self.saved_module(model), directory, generation_config, self.max_shard_size, arena)


def _nothing_to_write() -> WriteReport:
    return WriteReport()


def _copier(arena: Any) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    if arena is None:
        return lambda state: state  # sync: written before training resumes, read in place
    return lambda state: {name: arena.copy(t) for name, t in state.items()}


def write_module(
    module: nn.Module, directory: Path | None, generation_config: GenerationConfig | None, max_shard_size,
    arena: Any = None, share: ShardShare | None = None,
) -> Persist:
    """Collective: gather `module`'s weights into shards (as `save_pretrained` lays them out); returns `persist`,
    which writes what is left and the configs. Without an arena, shards are written as they fill (during the
    gather); with one, every tensor is copied into it and `persist` writes every file. With `share`
    (writers="all") this rank writes only its part."""
    plan = plan_shards(module, max_shard_size)
    writer = ShardWriter(directory, plan, defer=arena is not None, share=share) if directory is not None else None
    copied = _copier(arena)
    consume = (lambda state: writer.add(copied(plan.revert_names(state)))) if writer else None
    for_each_module_state(plan.groups, consume)
    if writer is None:
        return _nothing_to_write
    configs = _configs_to_write(module, generation_config) if share is None or share.publisher else []

    def persist() -> WriteReport:
        writer.finish()
        _write_configs(configs, writer.directory)
        return WriteReport(writer.peak_held_bytes, dict(writer.sha256))

    return persist


def _configs_to_write(module: nn.Module, generation_config: GenerationConfig | None) -> list[Any]:
    """The model config (and generation config, for a generative model) to save beside `module`'s weights,
    copied now: an async persist phase may write them while training goes on."""
    if not isinstance(module, PreTrainedModel):
        return []
    config = copy.deepcopy(module.config)
    config.dtype = str(module.dtype).split(".")[1]
    config.architectures = [model_class(module).__name__]
    return [config] + ([generation_config] if generation_config is not None and module.can_generate() else [])


def _write_configs(configs: list[Any], directory: Path) -> None:
    for config in configs:
        config.save_pretrained(directory)


@dataclass(frozen=True)
class LoRAAdapter:
    """A PEFT model's adapter only, in PEFT's format, loadable with `PeftModel.from_pretrained(base, dir)`.

    Every trainable parameter is saved (so `modules_to_save` works). `save_embedding_layers=None`
    saves the full embedding layers when they are targeted, or resized relative to a local base
    model directory; pass True for a vocabulary resized without a local base to compare with.
    `merged_final=True` also writes, at the final save only, the merged full model into `final/merged/`
    (loadable without PEFT; see `_merged_lora`).
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
            from ._merged_lora import check_mergeable

            check_mergeable(model)

    def at_final(self, tokenizer: Any) -> CheckpointStrategy:
        """The strategy of the final save: this one, or with `merged_final` the adapter plus `final/merged/`."""
        if not self.merged_final:
            return self
        from ._merged_lora import MergedLoRAFinal

        return MergedLoRAFinal(self, tokenizer)

    def saved_module(self, model: Any) -> nn.Module:  # a peft.PeftModel (peft is imported lazily: typed Any)
        return model.get_base_model()

    def estimate_bytes(self, model: nn.Module) -> int:
        return sum(stored_nbytes(t) for _, own in self._groups(model) for t in own.values())

    def save(self, model: Any, directory: Path | None, generation_config: GenerationConfig | None) -> WriteReport:
        return self.snapshot(model, directory, generation_config)()

    def snapshot(self, model: Any, directory: Path | None, generation_config: Any, arena: Any = None) -> Persist:
        self.check(model)
        settle(model)
        state: dict[str, torch.Tensor] = {}
        copied = _copier(arena)
        for_each_module_state(self._groups(model), (lambda s: state.update(copied(s))) if directory is not None else None)
        if directory is None:
            return _nothing_to_write
        embeddings = self._embeddings_saved(model)

        def persist() -> WriteReport:
            model.save_pretrained(str(directory), state_dict=state, save_embedding_layers=embeddings, is_main_process=True)
            if generation_config is not None:
                generation_config.save_pretrained(directory)
            return WriteReport(peak_held_bytes=sum(t.numel() * t.element_size() for t in state.values()))

        return persist

    def _groups(self, model: nn.Module) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
        wanted = {id(p) for p in model.parameters() if p.requires_grad}
        if self._embeddings_saved(model):
            wanted |= {id(p) for layer in _embedding_layers(model) for p in layer.parameters()}
        groups = []
        for prefix, module in model.named_modules():
            own = {n: t for n, t in own_state(module, f"{prefix}." if prefix else "").items() if id(t) in wanted}
            if own:
                groups.append((module, own))
        return groups

    def _embeddings_saved(self, model: nn.Module) -> bool:
        if self.save_embedding_layers is not None:
            return self.save_embedding_layers
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
