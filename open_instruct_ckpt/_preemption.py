"""Preemption signals: the handler only sets a flag; ranks agree on it at a step boundary."""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from typing import Any

from ._dist import any_rank

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_UNCATCHABLE = (signal.SIGKILL, signal.SIGSTOP)
_installed: PreemptionWatch | None = None  # at most one watch holds the process's handlers


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
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Take over the signals, first giving back those a run that died by an exception kept."""
        global _installed
        if not self.signals or threading.current_thread() is not threading.main_thread():
            return
        if _installed is not None:
            _installed.uninstall()
        self.requested = False
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

    def _on_signal(self, signum: int, frame: object) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """Collective (when signals are watched): True on every rank if any rank was signalled."""
        if not self.signals:
            return False
        return any_rank(self.requested)
