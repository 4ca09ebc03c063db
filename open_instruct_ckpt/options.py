"""Grouped options of `CheckpointCallback`: each object is valid on its own, checked when it is built.

- `TrainerInterval` (the default): save when the Trainer's schedule says so; with a failure rate, the
  optimal interval is logged and recorded (advice only).
- `AutoInterval`: save every N steps, N re-chosen after each save from measured costs and exactly one
  failure rate, never above `max_steps` (the Trainer's `save_steps` unless given).
- `Upload`: where published checkpoints are copied in the background, and how patiently.
- `Hook`: what runs after each publish (after its upload, with uploads), e.g. an evaluation.
- `Stalls`: when background work (a save, an upload, a hook) is reported as stalled.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._hooks import command as _command
from ._hooks.runner import HookRunner
from ._measure.stalls import StallWatch
from ._upload import targets
from ._upload.uploader import Retry, Uploader
from ._when.policy import AutoSchedule, Schedule, TrainerSchedule

# Bounds that keep every quantity of the advisor finite (seconds, steps, fractions) in float arithmetic.
MIN_MTBF_HOURS, MAX_MTBF_HOURS = 1 / 3600, 24 * 365 * 1e6
MIN_FAILURE_PROBABILITY = 1e-12


def _positive_finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_failure_rate(owner: str, mtbf_hours: Any, failure_probability: Any) -> None:
    for name, value in (("mtbf_hours", mtbf_hours), ("failure_probability", failure_probability)):
        if value is not None and not _positive_finite(value):
            raise ValueError(f"{owner}({name}={value!r}): must be a positive, finite number (or None)")
    if mtbf_hours is not None and not MIN_MTBF_HOURS <= mtbf_hours <= MAX_MTBF_HOURS:
        raise ValueError(
            f"{owner}(mtbf_hours={mtbf_hours!r}) is outside [{MIN_MTBF_HOURS:g}, {MAX_MTBF_HOURS:g}] hours (one second "
            "to a million years): give the mean time between failures of this job's machines, e.g. 24"
        )
    if failure_probability is not None and failure_probability < MIN_FAILURE_PROBABILITY:
        raise ValueError(f"{owner}(failure_probability={failure_probability!r}) is below {MIN_FAILURE_PROBABILITY:g}: "
                         "use the chance this run fails, e.g. 0.1")
    if failure_probability is not None and failure_probability > 1:
        raise ValueError(f"{owner}(failure_probability={failure_probability!r}) is a probability: use a number in "
                         "(0, 1]")
    if mtbf_hours is not None and failure_probability is not None:
        raise ValueError(f"{owner}: pass mtbf_hours or failure_probability, not both: they are two ways to give the "
                         "failure rate")


@dataclass(frozen=True)
class TrainerInterval:
    """Save when the Trainer's `save_strategy`/`save_steps` say so; a failure rate adds logged, recorded advice."""

    mtbf_hours: float | None = None
    failure_probability: float | None = None

    def __post_init__(self) -> None:
        _check_failure_rate("TrainerInterval", self.mtbf_hours, self.failure_probability)

    def schedule(self) -> Schedule:
        return TrainerSchedule()


@dataclass(frozen=True)
class AutoInterval:
    """Save every N steps, N re-chosen after each save from measured save and step times and the failure rate.

    Exactly one of `mtbf_hours` (mean time between failures) and `failure_probability` (the chance this run
    fails); N never exceeds `max_steps` (None: the Trainer's `save_steps`).
    """

    mtbf_hours: float | None = None
    failure_probability: float | None = None
    max_steps: int | None = None

    def __post_init__(self) -> None:
        _check_failure_rate("AutoInterval", self.mtbf_hours, self.failure_probability)
        if self.mtbf_hours is None and self.failure_probability is None:
            raise ValueError("AutoInterval chooses the interval from the failure rate: pass mtbf_hours= (e.g. 24) or "
                             "failure_probability= (the chance this run fails, e.g. 0.1)")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise ValueError(f"AutoInterval(max_steps={self.max_steps!r}) must be a positive int of steps, or None "
                             "(the Trainer's save_steps)")

    def schedule(self) -> Schedule:
        return AutoSchedule(self.max_steps)


Interval = TrainerInterval | AutoInterval


@dataclass(frozen=True)
class Upload:
    """Copy every published checkpoint to `to` (an fsspec URL such as "s3://bucket/prefix", or a local path).

    `storage_options` go to fsspec; train end waits at most `wait_s` for the queue (None: as long as it takes);
    every remote call on the training path (the start-up probe, train end's wait) gives up after `timeout_s`
    without an answer; `retry` says how often a failed checkpoint is tried again. Rank 0 uploads; with
    `{node}` in `to` (e.g. "s3://bucket/run/node{node}") each node's publisher (save_on_each_node=True) uploads
    its own copy there, `{node}` being 0, 1, ... in rank order.
    """

    to: str | os.PathLike
    storage_options: dict[str, Any] | None = None
    wait_s: float | None = 3600.0
    timeout_s: float = 60.0
    retry: Retry = field(default_factory=Retry)

    def __post_init__(self) -> None:
        if self.wait_s is not None and not _positive_finite(self.wait_s):
            raise ValueError(f"Upload(wait_s={self.wait_s!r}) must be a positive number of seconds, or None to wait "
                             "as long as it takes")
        if not _positive_finite(self.timeout_s):
            raise ValueError(f"Upload(timeout_s={self.timeout_s!r}) must be a positive number of seconds, e.g. 60")
        if not isinstance(self.retry, Retry):
            raise TypeError(f"Upload(retry={self.retry!r}) must be a Retry(tries=..., first_delay_s=..., max_delay_s=...)")
        targets.check(self.url(0) if isinstance(self.to, (str, os.PathLike)) else self.to, self.storage_options)

    @property
    def per_node(self) -> bool:
        return isinstance(self.to, (str, os.PathLike)) and NODE_FIELD in os.fspath(self.to)

    def url(self, node: int | None) -> str:
        return os.fspath(self.to).replace(NODE_FIELD, str(node or 0))

    def uploader(self, node: int | None = None) -> Uploader:
        return Uploader(targets.make(self.url(node), self.storage_options), self.wait_s, self.timeout_s, self.retry)


NODE_FIELD = "{node}"


@dataclass(frozen=True)
class Hook:
    """Run after each checkpoint is published (after its upload, with `upload=`), in order, in one background thread
    on rank 0. It never stops training: failures are logged with the command's output tail.

    `run`: a command, as a string split into arguments like a shell line (no shell runs it) or a list of arguments,
    in which `{path}`, `{step}`, `{name}` and `{url}` (the uploaded copy; else the path) are replaced; or a callable
    taking the published checkpoint (`.name`, `.step`, `.path`, `.url`). `timeout_s` stops one run of a command
    (None: no limit); train end waits at most `wait_s` for hooks running or queued, then stops them and names them.
    """

    run: str | Sequence[str] | Callable[[Any], Any]
    timeout_s: float | None = None
    wait_s: float = 600.0

    def __post_init__(self) -> None:
        _command.arguments(self.run)
        if self.timeout_s is not None and not _positive_finite(self.timeout_s):
            raise ValueError(f"Hook(timeout_s={self.timeout_s!r}) must be a positive number of seconds, or None")
        if not _positive_finite(self.wait_s):
            raise ValueError(f"Hook(wait_s={self.wait_s!r}) must be a positive number of seconds: train end waits "
                             "that long at most for hooks, e.g. 600")

    def runner(self) -> HookRunner:
        return HookRunner(self.run, _command.arguments(self.run), self.timeout_s, self.wait_s)


def hook_of(on_published: Any) -> Hook | None:
    """`on_published` as a Hook: a Hook, None, or what `Hook(run=...)` takes."""
    if on_published is None or isinstance(on_published, Hook):
        return on_published
    return Hook(on_published)


@dataclass(frozen=True)
class Stalls:
    """Background work (a save, an upload, a hook) is reported as stalled once it runs `factor` times as long as the
    last one of its kind, and at least `floor_s`; the report names the file, endpoint or command it is on, and is
    repeated every `every_s` while it lasts."""

    floor_s: float = 60.0
    factor: float = 3.0
    every_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("floor_s", "factor", "every_s"):
            if not _positive_finite(getattr(self, name)):
                raise ValueError(f"Stalls({name}={getattr(self, name)!r}) must be a positive, finite number")

    def watch(self) -> StallWatch:
        return StallWatch(self.floor_s, self.factor, self.every_s)


def stalls_of(stalls: Any) -> Stalls:
    if stalls is None:
        return Stalls()
    if not isinstance(stalls, Stalls):
        raise TypeError(f"stalls={stalls!r} must be a Stalls(floor_s=..., factor=..., every_s=...), or None for the "
                        "defaults")
    return stalls


__all__ = ["AutoInterval", "Hook", "Interval", "Retry", "Stalls", "TrainerInterval", "Upload"]

_DEPRECATED_UPLOAD = {"upload_to": "to", "upload_storage_options": "storage_options", "upload_wait_s": "wait_s",
                      "upload_timeout_s": "timeout_s"}
_DEPRECATED_INTERVAL = ("mtbf_hours", "failure_probability", "save_interval", "max_save_interval")


def from_keywords(interval: Interval | None, upload: Upload | None,
                  keywords: dict[str, Any]) -> tuple[Interval, Upload | None]:
    """The grouped options, from the new objects or the deprecated keywords (warned, naming the new spelling)."""
    unknown = sorted(set(keywords) - set(_DEPRECATED_UPLOAD) - set(_DEPRECATED_INTERVAL))
    if unknown:
        raise TypeError(f"CheckpointCallback got an unexpected keyword argument {unknown[0]!r}")
    old_upload = {new: keywords[old] for old, new in _DEPRECATED_UPLOAD.items() if old in keywords}
    old_interval = {name: keywords[name] for name in _DEPRECATED_INTERVAL if name in keywords}
    if old_upload:
        if "to" not in old_upload:
            raise ValueError(f"{sorted(old_upload)} configure an upload but upload_to is missing; pass "
                             "upload=Upload(to=..., ...)")
        old_names = sorted(old for old in _DEPRECATED_UPLOAD if old in keywords)
        upload = _replace(upload, "upload", lambda: Upload(**old_upload), old_names)
    if old_interval:
        interval = _replace(interval, "interval", lambda: _interval(old_interval), sorted(old_interval))
    return interval if interval is not None else TrainerInterval(), upload


def _interval(old: dict[str, Any]) -> Interval:
    mode = old.get("save_interval", "trainer")
    if mode not in ("trainer", "auto"):
        raise ValueError(f"save_interval={mode!r} must be 'trainer' (the Trainer's save_steps) or 'auto'")
    rates = {k: old[k] for k in ("mtbf_hours", "failure_probability") if old.get(k) is not None}
    if mode == "auto":
        return AutoInterval(**rates, max_steps=old.get("max_save_interval"))
    if old.get("max_save_interval") is not None:
        raise ValueError("max_save_interval bounds save_interval='auto'; pass interval=AutoInterval(..., max_steps=N)")
    return TrainerInterval(**rates)


def _replace(given: Any, name: str, build: Any, old: list[str]) -> Any:
    if given is not None:
        raise TypeError(f"CheckpointCallback got both {name}= and the deprecated keywords {old}; pass only {name}=")
    built = build()
    warnings.warn(f"CheckpointCallback({', '.join(f'{k}=...' for k in old)}) is deprecated: pass {name}={built!r}",
                  DeprecationWarning, stacklevel=4)
    return built
