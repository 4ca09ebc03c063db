"""Checkpoint saving for the HuggingFace Trainer: correct under ZeRO-3, small for LoRA, never half-written."""

from ._errors import CheckpointError
from ._generation_config import default_generation_config, olmo_generation_config
from ._readers import complete_checkpoints, latest_checkpoint, verify_checkpoint
from .callback import CheckpointCallback
from .strategies import CheckpointStrategy, FullModel, LoRAAdapter, ModelAttribute

__version__ = "0.1.0"

__all__ = [
    "CheckpointCallback",
    "CheckpointError",
    "CheckpointStrategy",
    "FullModel",
    "LoRAAdapter",
    "ModelAttribute",
    "complete_checkpoints",
    "default_generation_config",
    "latest_checkpoint",
    "olmo_generation_config",
    "verify_checkpoint",
]
