"""When to save: small decision policies the callback asks at each step end (after Orbax's `SaveDecisionPolicy`).

- `TrainerSchedule`: the Trainer's own schedule (`save_strategy`, `save_steps`, the last step), computed
  from `TrainingArguments` and `TrainerState` as `DefaultFlowCallback` computes it, so a callback that
  turned `control.should_save` off (another `CheckpointCallback`) does not hide a save from this one.
- `AutoSchedule`: every N steps, N re-chosen after each save from measured costs (`_advisor`),
  never above `max_interval` (the Trainer's `save_steps` unless given); the Trainer's save at the
  last step still happens.
- preemption: a signal on any rank means save now and stop; `SavePolicy` asks it first.

Rank contract: `SavePolicy.at_step_end` and `Schedule.adopt` are collective (an all-reduce of the
preemption flag; a broadcast of rank 0's interval), so every rank calls them at the same step ends.
`Schedule.saved` is local: a save counts from the step it started, whenever an async save's
measurement arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from transformers.trainer_utils import SaveStrategy

from .._dist import from_rank_zero
from .preemption import PreemptionWatch


@dataclass(frozen=True)
class Decision:
    save: bool = False
    stop: bool = False


class Schedule(Protocol):
    def start(self, args: Any, state: Any) -> None:
        """A `train()` begins (`state.save_steps` and `max_steps` are known)."""

    def decide(self, args: Any, state: Any, control: Any) -> Decision:
        """Local: whether this step end saves."""

    def current_interval(self, args: Any, state: Any) -> int:
        """Steps between saves now (for the advisor)."""

    def saved(self, step: int) -> None:
        """Local: a step save started at `step` (async or not); the next interval counts from it."""

    def adopt(self, proposal: int | None) -> None:
        """Collective: a save was measured; `proposal` is the writer's advised interval (None elsewhere)."""


def trainer_saves_at_step_end(args: Any, state: Any) -> bool:
    """What `DefaultFlowCallback.on_step_end` decides about saving, from the arguments and state alone."""
    if args.save_strategy != SaveStrategy.STEPS:
        return False
    periodic = bool(state.save_steps) and state.save_steps > 0 and state.global_step % state.save_steps == 0
    return periodic or state.global_step >= state.max_steps


def trainer_saves_at_epoch_end(args: Any) -> bool:
    """What `DefaultFlowCallback.on_epoch_end` decides about saving."""
    return args.save_strategy == SaveStrategy.EPOCH


class TrainerSchedule:
    """Save when the Trainer's schedule says so, or when any callback asked for a save (`control.should_save`)."""

    def start(self, args: Any, state: Any) -> None:
        pass

    def decide(self, args: Any, state: Any, control: Any) -> Decision:
        return Decision(save=trainer_saves_at_step_end(args, state) or control.should_save)

    def current_interval(self, args: Any, state: Any) -> int:
        if args.save_strategy == "steps" and state.save_steps:
            return min(int(state.save_steps), state.max_steps)
        if args.save_strategy == "epoch" and state.num_train_epochs:
            return max(1, round(state.max_steps / state.num_train_epochs))
        return max(1, state.max_steps)  # save_strategy="no": only final/

    def saved(self, step: int) -> None:
        pass

    def adopt(self, proposal: int | None) -> None:
        pass


class AutoSchedule:
    """Save every `interval` steps; after each save the writer's advised interval is broadcast and adopted.

    The interval starts at the Trainer's `save_steps` until a save has been measured, then stays
    within [1, upper bound], the bound being `max_interval` or else `save_steps`.
    """

    def __init__(self, max_interval: int | None) -> None:
        self.max_interval = max_interval
        self.upper = 1
        self.interval = 1
        self.changes: list[tuple[int, int]] = []  # (step, new interval), for logs and tests
        self._last_save = 0

    def start(self, args: Any, state: Any) -> None:
        self.upper = max(1, min(self.max_interval or int(state.save_steps), state.max_steps))
        self.interval = max(1, min(int(state.save_steps), self.upper))
        self._last_save, self.changes = state.global_step, []

    def decide(self, args: Any, state: Any, control: Any) -> Decision:
        due = state.global_step - self._last_save >= self.interval
        last_step = state.global_step >= state.max_steps
        return Decision(save=due or last_step)

    def current_interval(self, args: Any, state: Any) -> int:
        return self.interval

    def saved(self, step: int) -> None:
        self._last_save = step

    def adopt(self, proposal: int | None) -> None:
        chosen = from_rank_zero(proposal if proposal is not None else 0)
        if chosen > 0 and min(chosen, self.upper) != self.interval:
            self.interval = min(chosen, self.upper)
            self.changes.append((self._last_save, self.interval))


class SavePolicy:
    """Preemption first, then the schedule."""

    def __init__(self, watch: PreemptionWatch, schedule: Schedule) -> None:
        self.watch = watch
        self.schedule = schedule

    def at_step_end(self, args: Any, state: Any, control: Any) -> Decision:
        """Collective (when signals are watched): the decision every rank takes at this step end."""
        if self.watch.agreed():
            return Decision(save=True, stop=True)
        return self.schedule.decide(args, state, control)

    def at_epoch_end(self, args: Any, state: Any, control: Any) -> Decision:
        return Decision(save=trainer_saves_at_epoch_end(args) or control.should_save)


def check_training_arguments(auto: bool, args: Any) -> None:
    if auto and args.save_strategy != "steps":
        raise ValueError(
            f"AutoInterval adjusts a step interval, but save_strategy={_value(args.save_strategy)!r}; "
            "use save_strategy='steps' (save_steps is then the longest interval)"
        )


def _value(strategy: Any) -> Any:
    return getattr(strategy, "value", strategy)
