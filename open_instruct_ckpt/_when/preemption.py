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

from .._dist import any_rank

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_UNCATCHABLE = (signal.SIGKILL, signal.SIGSTOP)
_TRAINING_LOOP = "_inner_training_loop"  # Trainer's (and its subclasses') loop that calls every step hook

# Every watch of a running train() (several CheckpointCallbacks in one Trainer each have one): one process-wide
# handler per signal flags them all; the handlers from before the first watch are given back after the last.
_active: list[PreemptionWatch] = []
_previous: dict[int, Any] = {}


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
        self._loop: tuple[int, Any] | None = None  # (id, code) of the training loop's frame, when under a Trainer
        self._pid = os.getpid()

    def install(self) -> None:
        """Watch the signals for this run, first giving back the watches of runs that died by an exception."""
        if not self.signals or threading.current_thread() is not threading.main_thread():
            return
        self._loop, self._pid = _training_loop(sys._getframe(1)), os.getpid()
        for stale in [watch for watch in _active if watch is self or watch._loop != self._loop]:
            stale.uninstall()
        self.requested, self._received, self._answered = False, 0, 0
        _active.append(self)
        for sig in self.signals:
            if sig not in _previous:
                _previous[sig] = signal.signal(sig, _dispatch)

    def uninstall(self) -> None:
        if self in _active:
            _active.remove(self)
        if threading.current_thread() is threading.main_thread():  # a garbage collection can run anywhere
            for sig in [sig for sig in _previous if not any(sig in watch.signals for watch in _active)]:
                signal.signal(sig, _previous.pop(sig))

    def _trains(self, frame: Any) -> bool:
        """Whether the run this watch belongs to is still training where the signal interrupted."""
        # DataLoader workers (forked, other pids) inherit the handler and must outlive the signal: they only flag.
        return self._loop is None or os.getpid() != self._pid or _training_loop(frame) == self._loop

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


def _dispatch(signum: int, frame: Any) -> None:
    """The process's handler: flag every watch of a run that is training; where none is (train() raised past
    its callbacks), give the signal back and deliver it again (by default SIGTERM then ends the process)."""
    watching = [watch for watch in _active if signum in watch.signals]
    training = [watch for watch in watching if watch._trains(frame)]
    for watch in training:
        watch.requested = True
        watch._received += 1
    if training:
        return
    for watch in watching:
        watch.uninstall()
    if signum in _previous:  # a watch given back from another thread left this handler installed
        signal.signal(signum, _previous.pop(signum))
    signal.raise_signal(signum)


def _training_loop(frame: Any) -> tuple[int, Any] | None:
    """(id, code) of the innermost Trainer training-loop frame on `frame`'s stack, or None."""
    while frame is not None:
        if frame.f_code.co_name == _TRAINING_LOOP:
            return id(frame), frame.f_code
        frame = frame.f_back
    return None
