"""Preemption signals: the handler only sets a flag; ranks agree on it at a step boundary."""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence

from ._dist import any_rank

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatch:
    """Records that a preemption signal arrived; `agreed()` turns it into a decision all ranks share."""

    def __init__(self, signals: Sequence[int]) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.requested = False
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if not self.signals or threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: object) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """Collective (when signals are watched): True on every rank if any rank was signalled."""
        if not self.signals:
            return False
        return any_rank(self.requested)
