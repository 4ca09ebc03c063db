"""Preemption signals: the handler only sets a flag; ranks agree on it at a step boundary.

TrainerCallback has no hook for a train() that raises, so the handlers outlive such a run until the
next run, close() or garbage collection. Meanwhile a signal must keep its old meaning: the handler
looks for the Trainer's training loop on the interrupted stack, and where that loop is gone it gives
the signals back and delivers this one again (by default SIGTERM then ends the process).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from ._dist import any_rank

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_UNCATCHABLE = (signal.SIGKILL, signal.SIGSTOP)
_installed: PreemptionWatch | None = None  # at most one watch holds the process's handlers
_TRAINING_LOOP = "_inner_training_loop"  # Trainer's (and its subclasses') loop that calls every step hook


def parse_signals(signals: Any) -> tuple[signal.Signals, ...]:
    """Signals given as ints, `signal.Signals` or names ('SIGUSR1'); raise naming a bad one and the fix."""
    if isinstance(signals, (str, int)) or not isinstance(signals, Sequence):
        raise TypeError(
            f"preemption_signals={signals!r} must be a tuple of signals, e.g. (signal.SIGUSR1,) or ('SIGUSR1',); "
            "pass () to turn preemption handling off"
        )
    return tuple(_parse_one(value) for value in signals)


def _parse_one(value: Any) -> signal.Signals:
    try:
        if isinstance(value, str):
            parsed = signal.Signals[value.upper() if value.upper().startswith("SIG") else f"SIG{value.upper()}"]
        elif isinstance(value, int) and not isinstance(value, bool):
            parsed = signal.Signals(value)
        else:
            raise ValueError
    except (KeyError, ValueError):
        raise ValueError(
            f"preemption_signals: {value!r} is not a signal; use a name such as 'SIGUSR1' or a signal.Signals member"
        ) from None
    if parsed in _UNCATCHABLE:
        raise ValueError(
            f"preemption_signals: {parsed.name} cannot be caught, so no save can run on it; use SIGTERM or SIGUSR1 "
            "(SLURM: --signal=USR1@90)"
        )
    return parsed


class PreemptionWatch:
    """Records that a preemption signal arrived; `agreed()` turns it into a decision all ranks share."""

    def __init__(self, signals: Sequence[Any]) -> None:
        self.signals = parse_signals(signals)
        self.requested = False
        self._received = self._answered = 0  # signals handled this run; those a step end stopped training for
        self._previous: dict[int, Any] = {}
        self._loop: tuple[int, Any] | None = None  # (id, code) of the training loop's frame, when under a Trainer
        self._pid = os.getpid()

    def install(self) -> None:
        """Take over the signals, first giving back those a run that died by an exception kept."""
        global _installed
        if not self.signals or threading.current_thread() is not threading.main_thread():
            return
        if _installed is not None:
            _installed.uninstall()
        self.requested, self._received, self._answered = False, 0, 0
        self._loop, self._pid = _training_loop(sys._getframe(1)), os.getpid()
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        _installed = self

    def uninstall(self) -> None:
        global _installed
        if self._previous and threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (a garbage collection can run anywhere)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if _installed is self:
            _installed = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        # DataLoader workers (forked, other pids) inherit this handler and must outlive the signal: flag only.
        if self._loop is not None and os.getpid() == self._pid and _training_loop(frame) != self._loop:
            self.uninstall()  # train() raised past the callback: the run is over
            signal.raise_signal(signum)
            return
        self.requested = True
        self._received += 1

    def agreed(self) -> bool:
        """Collective (when signals are watched): True on every rank if any rank was signalled."""
        if not self.signals:
            return False
        agreed = any_rank(self.requested)
        if agreed:
            self._answered = self._received  # training stops for these
        return agreed

    def unanswered(self) -> bool:
        """True once this rank got a signal that no step end stopped training for: one during train end.

        Train end's upload wait polls it, so that a signal (kill, scancel) ends the wait at once, while the
        signal that stopped training is answered by that stop and leaves the wait to run.
        """
        return self._received > self._answered


def _training_loop(frame: Any) -> tuple[int, Any] | None:
    """(id, code) of the innermost Trainer training-loop frame on `frame`'s stack, or None."""
    while frame is not None:
        if frame.f_code.co_name == _TRAINING_LOOP:
            return id(frame), frame.f_code
        frame = frame.f_back
    return None
