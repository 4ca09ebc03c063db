"""`config.json` of a saved model, copied when the save is planned: an async save writes it while training goes on."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from .._engines import model_class
from .plan import SmallFile


def model_config(module: nn.Module, config: Any = None) -> list[SmallFile]:
    """The model config to save beside `module`'s weights (none for a module that is not a PreTrainedModel)."""
    if not isinstance(module, PreTrainedModel):
        return []
    saved = copy.deepcopy(module.config) if config is None else config
    saved.dtype = str(module.dtype).split(".")[1]
    saved.architectures = [model_class(module).__name__]
    return [SmallFile("config.json", lambda directory: saved.save_pretrained(directory))]
