"""Stall reports: background work (a save, an upload, a hook) that runs much longer than it did last time.

One watch thread per run looks at each source a few times a second. A task counts as stalled once it has
run longer than `factor` times the last measured duration of its kind (the watch measures each task it
sees end, to within its poll period), and never before `floor_s`; it is then reported, naming what it is
on (a file, an endpoint, a command), and again every `every_s` while it lasts. `waiting` says what
training is about to wait for. Reports only log: nothing here raises into training.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """One piece of background work in progress, as a source sees it now."""

    kind: str  # "save", "upload", "hook": durations are compared within a kind
    key: str  # the same while the same task runs
    what: str  # "the background save of step_4"
    doing: str  # "writing out/.tmp-step_4-.../model.safetensors"
    started: float  # time.monotonic()


Source = Callable[[], "Task | None"]


class StallWatch:
    def __init__(self, floor_s: float, factor: float, every_s: float, clock: Callable[[], float] = time.monotonic):
        self.floor_s, self.factor, self.every_s, self.clock = floor_s, factor, every_s, clock
        self.sources: list[Source] = []
        self.last_seconds: dict[str, float] = {}  # kind -> duration of the last task of that kind seen to end
        self._seen: dict[str, Task] = {}
        self._reported: dict[str, float] = {}  # key -> clock() of its last report
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def poll_s(self) -> float:
        return max(0.05, min(1.0, self.floor_s / 4, self.every_s / 4))

    def start(self, sources: list[Source]) -> None:
        self.stop()
        self.sources, self._seen, self._reported = list(sources), {}, {}
        self._stop = stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(stop,), name="open_instruct_ckpt-stalls",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        self._thread = None

    def expected_s(self, kind: str) -> float:
        """How long a task of `kind` may run before it counts as stalled."""
        last = self.last_seconds.get(kind)
        return self.floor_s if last is None else max(self.floor_s, self.factor * last)

    def check(self) -> None:
        """One look at every source: measure the tasks that ended, report the stalled ones."""
        now, current = self.clock(), {}
        for source in self.sources:
            task = _ask(source)
            if task is not None:
                current[task.key] = task
        for key, task in self._seen.items():
            if key not in current:
                self.last_seconds[task.kind] = now - task.started
                self._reported.pop(key, None)
        self._seen = current
        for task in current.values():
            self._report_if_stalled(task, now)

    def waiting(self, who: str, task: Task | None) -> None:
        """Say what `who` (e.g. "the save of step_6") is about to wait for: a warning when it is stalled."""
        if task is None:
            return
        elapsed = self.clock() - task.started
        stalled = elapsed >= self.expected_s(task.kind)
        logger.log(logging.WARNING if stalled else logging.INFO, "%s waits for %s (%s, running %.0f s%s)", who,
                   task.what, task.doing, elapsed, "; stalled" if stalled else "")

    def _report_if_stalled(self, task: Task, now: float) -> None:
        elapsed, expected = now - task.started, self.expected_s(task.kind)
        last_report = self._reported.get(task.key)
        if elapsed < expected or (last_report is not None and now - last_report < self.every_s):
            return
        self._reported[task.key] = now
        last = self.last_seconds.get(task.kind)
        why = f"{self.factor:g}x the last {task.kind}'s {last:.1f} s" if last is not None else "no earlier one measured"
        logger.warning("%s has run %.0f s, longer than expected (%.0f s: %s, at least Stalls(floor_s=%g)); it is %s",
                       task.what[:1].upper() + task.what[1:], elapsed, expected, why, self.floor_s, task.doing)

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as exc:  # a report must never end the watch, nor training
                logger.debug("stall check failed: %s", exc)


def _ask(source: Source) -> Task | None:
    try:
        return source()
    except Exception:  # a source reads another thread's state; a torn read is skipped, not fatal
        return None
