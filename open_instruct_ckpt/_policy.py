"""When to save: small decision policies the callback asks at each step end (after Orbax's `SaveDecisionPolicy`).

- `TrainerSchedule`: the Trainer's own schedule (`save_strategy`, `save_steps`, the last step), computed
  from `TrainingArguments` and `TrainerState` as `DefaultFlowCallback` computes it, so a callback that
  turned `control.should_save` off (another `CheckpointCallback`) does not hide a save from this one.
- `AutoInterval`: every N steps, N re-chosen after each save from measured costs (`_advisor`),
  never above `max_interval` (the Trainer's `save_steps` unless given); the Trainer's save at the
  last step still happens.
- preemption: a signal on any rank means save now and stop; `SavePolicy` asks it first.

Rank contract: `SavePolicy.at_step_end` and `Schedule.adopt` are collective (an all-reduce of the
preemption flag; a broadcast of rank 0's interval), so every rank calls them at the same step ends.
`Schedule.saved` is local: a save counts from the step it started, whenever an async save's
measurement arrives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from transformers.trainer_utils import SaveStrategy

from ._dist import from_rank_zero
from ._preemption import PreemptionWatch

SAVE_INTERVALS = ("trainer", "auto")
# Bounds that keep every quantity of the advisor finite (seconds, steps, fractions) in float arithmetic.
MIN_MTBF_HOURS, MAX_MTBF_HOURS = 1 / 3600, 24 * 365 * 1e6
MIN_FAILURE_PROBABILITY = 1e-12


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


class AutoInterval:
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


def schedule_for(save_interval: str, max_interval: int | None) -> Schedule:
    return AutoInterval(max_interval) if save_interval == "auto" else TrainerSchedule()


def check_arguments(save_interval: Any, max_interval: Any, mtbf_hours: Any, failure_probability: Any) -> None:
    """Raise, naming the value and the fix, for save-interval arguments that cannot work."""
    if save_interval not in SAVE_INTERVALS:
        raise ValueError(f"save_interval={save_interval!r} must be 'trainer' (the Trainer's save_steps) or 'auto'")
    for name, value in (("mtbf_hours", mtbf_hours), ("failure_probability", failure_probability)):
        if value is not None and not _positive_finite(value):
            raise ValueError(f"{name}={value!r} must be a positive, finite number (or None)")
    if mtbf_hours is not None and not MIN_MTBF_HOURS <= mtbf_hours <= MAX_MTBF_HOURS:
        raise ValueError(
            f"mtbf_hours={mtbf_hours!r} is outside [{MIN_MTBF_HOURS:g}, {MAX_MTBF_HOURS:g}] hours (one second to "
            "a million years): give the mean time between failures of this job's machines, e.g. 24"
        )
    if failure_probability is not None and failure_probability < MIN_FAILURE_PROBABILITY:
        raise ValueError(f"failure_probability={failure_probability!r} is below {MIN_FAILURE_PROBABILITY:g}: "
                         "use the chance this run fails, e.g. 0.1")
    if failure_probability is not None and failure_probability > 1:
        raise ValueError(f"failure_probability={failure_probability!r} is a probability: use a number in (0, 1]")
    if mtbf_hours is not None and failure_probability is not None:
        raise ValueError("pass mtbf_hours or failure_probability, not both: they are two ways to give the failure rate")
    if save_interval == "auto" and mtbf_hours is None and failure_probability is None:
        raise ValueError(
            "save_interval='auto' chooses the interval from the failure rate: pass mtbf_hours= (e.g. 24) or "
            "failure_probability= (the chance this run fails, e.g. 0.1)"
        )
    if max_interval is not None and (
        isinstance(max_interval, bool) or not isinstance(max_interval, int) or max_interval < 1
    ):
        raise ValueError(f"max_save_interval={max_interval!r} must be a positive int of steps, or None (save_steps)")
    if max_interval is not None and save_interval != "auto":
        raise ValueError("max_save_interval bounds save_interval='auto'; pass save_interval='auto' or drop it")


def check_training_arguments(save_interval: str, args: Any) -> None:
    if save_interval == "auto" and args.save_strategy != "steps":
        raise ValueError(
            f"save_interval='auto' adjusts a step interval, but save_strategy={_value(args.save_strategy)!r}; "
            "use save_strategy='steps' (save_steps is then the longest interval)"
        )


def _positive_finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _value(strategy: Any) -> Any:
    return getattr(strategy, "value", strategy)
