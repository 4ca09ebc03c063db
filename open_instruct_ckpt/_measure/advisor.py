"""Checkpoint economics: how often to save, from measured costs. Pure functions, stdlib only.

Saving every N steps costs, over a run of T steps that each take s seconds:
- save overhead: (T / N) x C, where C is the blocking seconds of one save;
- expected lost compute: F x (N / 2) x s, where F is the expected number of failures in the run
  (a failure loses on average half an interval); F = T x s / MTBF, or the given probability P;
- disk: the kept checkpoints (retention) x the size of one, plus one more while a save is written.
Their sum is smallest at N* = sqrt(2 T C / (F s)). With a mean time between failures this is
Young/Daly's interval in seconds, N* x s = sqrt(2 C MTBF), independent of T.
Per step the same costs are the fractions C / (N s) (overhead) and f N / 2 (loss), where
f = F / T is the failure rate per step; every quantity below is computed from those.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

from .._format.units import HOUR, human_bytes, human_seconds

TABLE_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class Costs:
    """Measured (or given) costs of one run; exactly one of `mtbf_hours` and `failure_probability`."""

    save_seconds: float
    step_seconds: float
    mtbf_hours: float | None = None
    failure_probability: float | None = None
    total_steps: int | None = None
    checkpoint_bytes: int | None = None
    keep_last: int | None = None


@dataclass(frozen=True)
class IntervalCost:
    """What saving every `steps` steps costs: as fractions of compute time, and in seconds when T is known."""

    steps: int
    seconds: float
    overhead_fraction: float
    loss_fraction: float
    overhead_seconds: float | None
    lost_seconds: float | None
    kept_checkpoints: int | None
    disk_bytes: int | None

    @property
    def total_fraction(self) -> float:
        return self.overhead_fraction + self.loss_fraction


@dataclass(frozen=True)
class Advice:
    costs: Costs
    optimal_exact: float
    optimal: IntervalCost
    current: IntervalCost | None
    table: list[IntervalCost]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class UnusableCost(ValueError):
    """Costs the formulas cannot use: the message names the value and the fix, `field` the input
    (a `Costs` field, `current_interval`, or None when only the values together fail)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_costs(costs: Costs, current_steps: Any = None) -> None:
    """Raise an UnusableCost for any input the formulas cannot use, of any type, and for values whose
    optimum or costs overflow a float (each is a finite number in range, but not all of them together)."""
    _check_rates(costs)
    _check_counts(costs, current_steps)
    try:
        finite = all(math.isfinite(x) for x in _results(costs, current_steps))
    except (ArithmeticError, ValueError):
        finite = False
    if not finite:
        raise UnusableCost(None, f"these costs overflow, the optimum or a cost is not a finite number "
                                 f"({_given(costs)}): give the seconds, hours and sizes of a real run")


def _check_rates(costs: Costs) -> None:
    step, save, mtbf, probability = costs.step_seconds, costs.save_seconds, costs.mtbf_hours, costs.failure_probability
    if not _positive(step):
        raise UnusableCost("step_seconds", f"step seconds {_shown(step)} must be a positive number of seconds per step")
    if not _number(save) or save < 0:
        raise UnusableCost("save_seconds", f"save seconds {_shown(save)} must be a number of seconds >= 0")
    if (mtbf is None) == (probability is None):
        raise UnusableCost(None, "give exactly one of the mean time between failures (hours) and the failure "
                                 "probability")
    if mtbf is not None and not _positive(mtbf):
        raise UnusableCost("mtbf_hours", f"mtbf_hours={_shown(mtbf)} must be a positive number of hours, e.g. 24")
    if probability is not None and (not _number(probability) or not 0 < probability <= 1):
        raise UnusableCost("failure_probability", f"failure probability {_shown(probability)} must be in (0, 1], "
                                                  "e.g. 0.1")
    if probability is not None and costs.total_steps is None:
        raise UnusableCost("total_steps", "a failure probability is per run: give the run's total steps too")


_COUNTS = (  # field, its least value, what it is
    ("total_steps", 1, "the run's length in steps, e.g. 10000"),
    ("keep_last", 1, "how many step checkpoints retention keeps, e.g. 3"),
    ("checkpoint_bytes", 0, "the size of one checkpoint in bytes, e.g. 16000000000"),
)


def _check_counts(costs: Costs, current_steps: Any) -> None:
    counts = [(name, getattr(costs, name), least, what) for name, least, what in _COUNTS]
    for name, value, least, what in [*counts, ("current_interval", current_steps, 1, "the save interval, e.g. 500")]:
        if value is not None and (not _is_int(value) or value < least):
            raise UnusableCost(name, f"{name.replace('_', ' ')} {_shown(value)} must be a whole number >= {least}: "
                                     f"{what}")


def _results(costs: Costs, current_steps: int | None) -> list[float]:
    """Every number the advice shows, as floats (an int too large for a float raises OverflowError)."""
    exact = _optimum(costs)
    results = [exact, exact * costs.step_seconds]
    if costs.mtbf_hours is not None:
        results.append(young_daly_seconds(costs.save_seconds, costs.mtbf_hours))
    for steps in _table_steps(costs, _rounded(costs, exact), current_steps):
        cost = interval_cost(costs, steps)
        results += [float(cost.steps), cost.seconds, cost.overhead_fraction, cost.loss_fraction,
                    cost.overhead_seconds or 0.0, cost.lost_seconds or 0.0]
        if cost.disk_bytes is not None and costs.checkpoint_bytes is not None:
            results.append(float(cost.disk_bytes + costs.checkpoint_bytes))
    return results


def _given(costs: Costs) -> str:
    given = {name: value for name, value in asdict(costs).items() if value is not None}
    return ", ".join(f"{name.replace('_', ' ')} {_shown(value)}" for name, value in given.items())


def _shown(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than Python converts to text
        return "an int of thousands of digits"
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    """A finite int or float (an int beyond a float's range is not)."""
    return (_is_int(value) or isinstance(value, float)) and abs(value) <= sys.float_info.max


def _positive(value: Any) -> bool:
    return _number(value) and value > 0


def failures_per_step(costs: Costs) -> float:
    """f: the expected number of failures per training step."""
    if costs.mtbf_hours is not None:
        return costs.step_seconds / (costs.mtbf_hours * HOUR)
    assert costs.failure_probability is not None and costs.total_steps is not None
    return costs.failure_probability / costs.total_steps


def optimal_interval(costs: Costs) -> float:
    """N* = sqrt(2 C / (f s)) in steps (unbounded, fractional); the same as sqrt(2 T C / (F s))."""
    check_costs(costs)
    return _optimum(costs)


def _optimum(costs: Costs) -> float:
    return math.sqrt(2 * costs.save_seconds / (failures_per_step(costs) * costs.step_seconds))


def young_daly_seconds(save_seconds: float, mtbf_hours: float) -> float:
    """T* = sqrt(2 C MTBF): the optimal time between checkpoints, in seconds."""
    return math.sqrt(2 * save_seconds * mtbf_hours * HOUR)


def optimal_steps(costs: Costs) -> int:
    """N* rounded to a whole number of steps, at least 1 and at most the run's total steps when known."""
    check_costs(costs)
    return _rounded(costs, _optimum(costs))


def _rounded(costs: Costs, exact: float) -> int:
    steps = max(1, round(exact))
    return min(steps, costs.total_steps) if costs.total_steps is not None else steps


def interval_cost(costs: Costs, steps: int) -> IntervalCost:
    """Overhead, expected loss and disk of saving every `steps` steps."""
    overhead = costs.save_seconds / (steps * costs.step_seconds)
    loss = failures_per_step(costs) * steps / 2
    compute = costs.total_steps * costs.step_seconds if costs.total_steps is not None else None
    kept = kept_checkpoints(steps, costs.total_steps, costs.keep_last)
    disk = kept * costs.checkpoint_bytes if kept is not None and costs.checkpoint_bytes is not None else None
    return IntervalCost(
        steps=steps, seconds=steps * costs.step_seconds, overhead_fraction=overhead, loss_fraction=loss,
        overhead_seconds=overhead * compute if compute is not None else None,
        lost_seconds=loss * compute if compute is not None else None,
        kept_checkpoints=kept, disk_bytes=disk,
    )


def kept_checkpoints(steps: int, total_steps: int | None, keep_last: int | None) -> int | None:
    """Step checkpoints on disk at the end: all ceil(T / N) of them, at most `keep_last`; None if unbounded."""
    written = math.ceil(total_steps / steps) if total_steps is not None else None
    if keep_last is None:
        return written
    return keep_last if written is None else min(keep_last, written)


def advise(costs: Costs, current_steps: int | None = None) -> Advice:
    """The optimum, the current interval's costs beside it, and a small trade-off table around the optimum."""
    check_costs(costs, current_steps)
    exact = _optimum(costs)
    best = _rounded(costs, exact)
    current = interval_cost(costs, current_steps) if current_steps is not None else None
    table = [interval_cost(costs, n) for n in _table_steps(costs, best, current_steps)]
    return Advice(costs, exact, interval_cost(costs, best), current, table)


def _table_steps(costs: Costs, best: int, current_steps: int | None) -> list[int]:
    steps = {max(1, round(best * factor)) for factor in TABLE_FACTORS}
    if costs.total_steps is not None:
        steps = {min(n, costs.total_steps) for n in steps}
    if current_steps is not None:
        steps.add(current_steps)
    return sorted(steps)


# -- rendering (plain text, for the log and the command line) ------------------------------------

def describe_failures(costs: Costs) -> str:
    if costs.mtbf_hours is not None:
        return f"MTBF {costs.mtbf_hours:g} h"
    return f"failure probability {costs.failure_probability:g} per run"


def summary(advice: Advice) -> str:
    """A few lines: the optimum, the current interval against it, and disk use."""
    costs, best = advice.costs, advice.optimal
    capped = " (capped at the run's length)" if best.steps < round(advice.optimal_exact) else ""
    lines = [
        f"save {costs.save_seconds:.2f} s blocking, step {costs.step_seconds:.3f} s, {describe_failures(costs)}",
        f"optimal interval: {best.steps} steps ({human_seconds(best.seconds)}){capped}: overhead "
        f"{best.overhead_fraction:.2%}, expected loss {best.loss_fraction:.2%} of compute",
    ]
    if advice.current is not None:
        now = advice.current
        lines.append(
            f"current interval: {now.steps} steps ({human_seconds(now.seconds)}): overhead "
            f"{now.overhead_fraction:.2%}, expected loss {now.loss_fraction:.2%} of compute"
        )
    for label, cost in (("at the optimum", best), ("at the current interval", advice.current)):
        if cost is not None and cost.disk_bytes is not None and costs.checkpoint_bytes is not None:
            lines.append(
                f"disk {label}: {cost.kept_checkpoints} x {human_bytes(costs.checkpoint_bytes)} = "
                f"{human_bytes(cost.disk_bytes)} ({human_bytes(cost.disk_bytes + costs.checkpoint_bytes)} while saving)"
            )
    return "\n".join(lines)


def table(advice: Advice) -> str:
    """The trade-off table: one row per interval, the optimum and the current one marked."""
    header = f"{'interval':>9}  {'every':>9}  {'overhead':>8}  {'exp. loss':>9}  {'total':>7}  {'disk':>10}"
    rows = [header]
    for cost in advice.table:
        mark = "  optimal" if cost.steps == advice.optimal.steps else ""
        if advice.current is not None and cost.steps == advice.current.steps:
            mark += "  current"
        disk = human_bytes(cost.disk_bytes) if cost.disk_bytes is not None else "-"
        rows.append(
            f"{cost.steps:>9}  {human_seconds(cost.seconds):>9}  {cost.overhead_fraction:>8.2%}  "
            f"{cost.loss_fraction:>9.2%}  {cost.total_fraction:>7.2%}  {disk:>10}{mark}"
        )
    return "\n".join(rows)
