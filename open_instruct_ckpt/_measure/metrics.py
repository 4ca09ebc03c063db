"""Save metrics into the Trainer's log: `state.log_history` and every `report_to` logger.

The Trainer calls its `report_to` integrations (TensorBoard, W&B, MLflow...) before user
callbacks and gives callbacks no handle on itself, so a callback cannot add values to the
Trainer's own log call. `Trainer.log` is the one path that reaches them all: it appends to
`state.log_history` and calls every callback's `on_log`. The Trainer is found once per
`train()`, at `on_train_begin`, as the object whose training loop called the hook (a few frames
up the stack). Where it cannot be found (a loop other than `Trainer.train`), the metrics still
go into `state.log_history`.
"""

from __future__ import annotations

import sys
import weakref
from types import FrameType
from typing import Any

_SEARCH_DEPTH = 8


def calling_trainer() -> Any | None:
    """The `transformers.Trainer` whose method is on the call stack, nearest first; None if there is none."""
    from transformers import Trainer

    frame: FrameType | None = sys._getframe(1)
    for _ in range(_SEARCH_DEPTH):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


class TrainerLog:
    """Where this run's save metrics go: the Trainer's `log()`, else `state.log_history`."""

    def __init__(self) -> None:
        self._trainer: weakref.ref | None = None

    def attach(self, trainer: Any | None) -> None:
        self._trainer = weakref.ref(trainer) if trainer is not None else None

    def emit(self, metrics: dict[str, float], state: Any, control: Any) -> None:
        """Log `metrics` at the current step (writer only; reporters themselves log on the main process)."""
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is None or trainer.state is not state:
            state.log_history.append({**metrics, "step": state.global_step})
            return
        wanted = control.should_log
        trainer.log(dict(metrics))
        control.should_log = wanted  # on_log clears it; the Trainer's own log at this step still happens
