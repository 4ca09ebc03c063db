"""Run the `on_published` hook for each checkpoint, in order, in one background thread on rank 0.

Nothing here may stop or slow training: `enqueue` returns at once; a command runs in its own session at a
lower CPU priority, its output is kept (the last `TAIL_CHARS`) for the log; a failure, a non-zero exit or a
run past `timeout_s` is a warning with that output, and the next checkpoint's hook runs next. Train end
(`finish`) waits at most `wait_s`, then stops the command in progress, drops the queue and names both.
"""

from __future__ import annotations

import collections
import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._format.manifest import MANIFEST_NAME
from . import command

logger = logging.getLogger(__name__)

TAIL_CHARS = 2000  # of a command's output, kept for the log
_GRACE_S = 5.0  # between SIGTERM and SIGKILL of a command that is stopped
_NICENESS = 10  # a command yields the CPU to training


@dataclass
class Running:
    """The hook in progress: for which checkpoint, since when (time.monotonic()), and its process if a command."""

    checkpoint: command.Published
    label: str  # the command line as run, or the callable's name
    started: float
    process: subprocess.Popen | None = None
    tail: collections.deque | None = None

    def describe(self) -> str:
        what = f"`{self.label}` for {self.checkpoint.name}, {time.monotonic() - self.started:.0f} s so far"
        if self.process is not None:
            what += f" (pid {self.process.pid})"
            last = _text(self.tail).strip().splitlines()[-1:] if self.tail else []
            if last:
                what += f", last output: {last[0][-200:]!r}"
        return what


class HookRunner:
    """One worker thread; every method returns without raising."""

    def __init__(self, run: Any, argv: list[str] | None, timeout_s: float | None, wait_s: float) -> None:
        self.run, self.argv, self.timeout_s, self.wait_s = run, argv, timeout_s, wait_s
        self.name = command.describe(run, argv)
        self._cond = threading.Condition()
        self._queue: collections.deque[command.Published] = collections.deque()
        self._running: Running | None = None
        self._stop = threading.Event()
        self._stop.set()  # closed until `open`
        self._thread: threading.Thread | None = None
        self.done: list[tuple[str, bool]] = []  # (checkpoint name, succeeded), in the order the hooks ran

    @property
    def running(self) -> Running | None:
        return self._running

    def open(self) -> None:
        """A run begins: a fresh queue and worker (one abandoned by an earlier run touches nothing of this one)."""
        self.stop()
        with self._cond:
            self._stop, self._thread, self.done = threading.Event(), None, []

    def enqueue(self, checkpoint: command.Published) -> None:
        with self._cond:
            if self._stop.is_set():
                return  # not open
            self._queue.append(checkpoint)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, args=(self._stop,), daemon=True,
                                                name="open_instruct_ckpt-hook")
                self._thread.start()
            self._cond.notify_all()

    def unfinished(self) -> str | None:
        """What is running or queued, the running hook first; None when idle."""
        with self._cond:
            running, queued = self._running, [c.name for c in self._queue]
        names = ([f"{running.checkpoint.name} (running: {running.describe()})"] if running else [])
        names += [f"{name} (queued)" for name in queued]
        return ", ".join(names) or None

    def finish(self, stop_when: Callable[[], bool] = lambda: False) -> None:
        """Train end: wait for the queue at most `wait_s` (less if `stop_when()` turns True), then abandon the rest."""
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while (self._queue or self._running) and not stop_when() and time.monotonic() < deadline:
                self._cond.wait(min(0.2, max(0.0, deadline - time.monotonic())))
        left = self.unfinished()
        if left is not None:
            why = "a preemption signal ended the wait" if stop_when() else f"Hook(wait_s={self.wait_s}) s have passed"
            logger.warning("Train end stopped waiting for the on_published hook `%s` (%s); abandoned: %s. A command "
                           "in progress is stopped; run the rest by hand", self.name, why, left)
        self.stop()

    def stop(self) -> None:
        """Drop the queue and stop the command in progress (a callable cannot be stopped: it runs on, unwaited)."""
        with self._cond:
            self._stop.set()
            self._queue.clear()
            running, self._running = self._running, None
            self._cond.notify_all()
        if running is not None and running.process is not None:
            _terminate(running.process)

    # -- the worker --------------------------------------------------------------------------------

    def _work(self, stop: threading.Event) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or stop.is_set())
                if stop.is_set():
                    return
                checkpoint = self._queue.popleft()
                label = self.name if self.argv is None else shlex.join(command.command_for(self.argv, checkpoint))
                running = self._running = Running(checkpoint, label, time.monotonic())
            try:
                ok = self._run_one(running, stop)
            except BaseException as exc:  # never let the worker die silently
                logger.warning("The on_published hook `%s` for %s failed: %s: %s", self.name, checkpoint.name,
                               type(exc).__name__, exc)
                ok = False
            with self._cond:
                if not stop.is_set():  # else stop() abandoned this worker: a later run's state is not its own
                    self._running = None
                    self.done.append((checkpoint.name, ok))
                self._cond.notify_all()

    def _run_one(self, running: Running, stop: threading.Event) -> bool:
        checkpoint = running.checkpoint
        if checkpoint.url == str(checkpoint.path) and not (checkpoint.path / MANIFEST_NAME).is_file():
            logger.info("The on_published hook %s is not run for %s: pruned (keep_last) before its turn", self.name,
                        checkpoint.name)
            return False
        if self.argv is None:
            try:
                self.run(checkpoint)
            except Exception:
                logger.warning("The on_published hook %s failed for %s (training goes on)", self.name,
                               checkpoint.name, exc_info=True)
                return False
            logger.info("The on_published hook %s for %s finished in %.1f s", self.name, checkpoint.name,
                        time.monotonic() - running.started)
            return True
        return self._run_command(running, stop)

    def _run_command(self, running: Running, stop: threading.Event) -> bool:
        checkpoint = running.checkpoint
        assert self.argv is not None
        argv = command.command_for(self.argv, checkpoint)
        running.tail = collections.deque()
        running.process = process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=command.environment_for(checkpoint), start_new_session=True)
        _lower_priority(process.pid)
        timed_out = threading.Event()

        def time_out() -> None:
            timed_out.set()
            _terminate(process)

        timer = threading.Timer(self.timeout_s or 0, time_out)
        timer.daemon = True
        if self.timeout_s is not None:
            timer.start()
        try:
            _keep_tail(process, running.tail)
            status = process.wait()
        finally:
            timer.cancel()
        seconds, output = time.monotonic() - running.started, _text(running.tail).rstrip()
        if status == 0:
            logger.info("The on_published hook `%s` for %s finished in %.1f s", shlex.join(argv), checkpoint.name,
                        seconds)
            return True
        if not stop.is_set():
            why = f"was stopped after Hook(timeout_s={self.timeout_s})" if timed_out.is_set() else \
                f"exited with status {status}"
            logger.warning("The on_published hook `%s` for %s %s after %.1f s (training goes on); its output ended "
                           "with:\n%s", shlex.join(argv), checkpoint.name, why, seconds, output or "(no output)")
        return False


def _keep_tail(process: subprocess.Popen, tail: collections.deque) -> None:
    """Read the command's output to its end, keeping about the last TAIL_CHARS bytes."""
    stream: Any = process.stdout
    kept = 0
    for chunk in iter(lambda: stream.read1(4096), b""):
        tail.append(chunk)
        kept += len(chunk)
        while kept - len(tail[0]) >= TAIL_CHARS:
            kept -= len(tail.popleft())
    stream.close()


def _text(tail: collections.deque | None) -> str:
    data = b"".join(list(tail or ()))
    return data[-TAIL_CHARS:].decode(errors="replace")


def _lower_priority(pid: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, pid) + _NICENESS))
    except (OSError, AttributeError):  # gone already, or not allowed: it runs at training's priority
        pass


def _terminate(process: subprocess.Popen) -> None:
    """SIGTERM to the command's process group, SIGKILL after a grace period; never raises."""
    for sig, wait in ((signal.SIGTERM, _GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        if wait is None:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
