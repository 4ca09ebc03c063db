"""Checkpoint saving for the HuggingFace Trainer: correct under ZeRO-3, small for LoRA, never half-written."""

from ._dist import CheckpointError
from ._generation_config import default_generation_config, olmo_generation_config
from ._io import latest_checkpoint
from ._manifest import verify_checkpoint
from .callback import CheckpointCallback
from .strategies import FullModel, LoRAAdapter, ModelAttribute, SaveStrategy

__version__ = "0.1.0"

__all__ = [
    "CheckpointCallback",
    "CheckpointError",
    "FullModel",
    "LoRAAdapter",
    "ModelAttribute",
    "SaveStrategy",
    "default_generation_config",
    "latest_checkpoint",
    "olmo_generation_config",
    "verify_checkpoint",
]
