"""What every save of one run shares, fixed when the callback sets the run up."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .generation_config import GenerationConfigSpec


@dataclass(frozen=True)
class Run:
    """Identifies the run in every manifest it writes: readers rank a later run's checkpoints newer."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_unix: float = field(default_factory=time.time)


@dataclass(frozen=True)
class SaveSettings:
    tokenizer: Any
    generation_config: GenerationConfigSpec
    output_dir: Path
    keep_last: int | None
    run: Run = field(default_factory=Run)
    show_progress: bool = False  # a bar for saves longer than about a second (off with disable_tqdm)
