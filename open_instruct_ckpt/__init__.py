"""Checkpoint saving for the HuggingFace Trainer: correct under ZeRO-3, small for LoRA, never half-written.

Names that need torch or transformers load on first use (PEP 562), so the readers and the
command line (`open_instruct_ckpt.cli`) start without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import CheckpointError
from ._format.readers import complete_checkpoints, latest_checkpoint, verify_checkpoint

if TYPE_CHECKING:
    from ._write.generation_config import default_generation_config, olmo_generation_config
    from .callback import CheckpointCallback
    from .options import AutoInterval, Hook, Retry, Stalls, TrainerInterval, Upload
    from .strategies import CheckpointStrategy, FullModel, LoRAAdapter, ModelAttribute

__version__ = "0.1.0"

__all__ = [
    "AutoInterval",
    "CheckpointCallback",
    "CheckpointError",
    "CheckpointStrategy",
    "FullModel",
    "Hook",
    "LoRAAdapter",
    "ModelAttribute",
    "Retry",
    "Stalls",
    "TrainerInterval",
    "Upload",
    "complete_checkpoints",
    "default_generation_config",
    "latest_checkpoint",
    "olmo_generation_config",
    "verify_checkpoint",
]

_LAZY = {
    "CheckpointCallback": ".callback",
    "CheckpointStrategy": ".strategies",
    "FullModel": ".strategies",
    "LoRAAdapter": ".strategies",
    "ModelAttribute": ".strategies",
    "default_generation_config": "._write.generation_config",
    "olmo_generation_config": "._write.generation_config",
    "AutoInterval": ".options",
    "Hook": ".options",
    "Retry": ".options",
    "Stalls": ".options",
    "TrainerInterval": ".options",
    "Upload": ".options",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
