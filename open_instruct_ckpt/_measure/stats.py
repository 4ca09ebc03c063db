"""What one save cost, phase by phase, and how long a training step takes. Stdlib only.

A save's phases: prepare (writer checks, staging), write (gather and write every file, hash),
seal (fsync, manifest), publish (the rename), clean-up (retention, leftovers). The manifest
records the phases that end before it is written; the callback keeps all of them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

PHASES = ("prepare", "write", "seal", "publish", "cleanup")


@dataclass
class SaveStats:
    """Seconds per phase, bytes written and peak CPU bytes held by one save on the writer.

    `blocking_seconds` is what training waited for: `total_seconds` for an inline save, the
    prepare and snapshot phases for an async one (its other phases ran in the background).
    """

    name: str
    step: int
    bytes: int = 0
    peak_held_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    blocking_seconds: float = 0.0

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def in_manifest(self) -> dict[str, Any]:
        """The part known when the manifest is written: the phases before the seal, bytes, peak memory."""
        before = {phase: round(s, 6) for phase, s in self.seconds.items() if phase in ("prepare", "write")}
        return {"seconds": before, "bytes": self.bytes, "peak_held_bytes": self.peak_held_bytes}

    def metrics(self) -> dict[str, float]:
        """The values the Trainer's loggers receive after each save."""
        total = self.total_seconds
        return {
            "checkpoint/save_seconds": round(total, 4),
            "checkpoint/blocking_seconds": round(self.blocking_seconds, 4),
            "checkpoint/bytes": self.bytes,
            "checkpoint/gb_per_s": round(self.bytes / total / 1e9, 4) if total > 0 else 0.0,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_seconds": self.total_seconds}

    @classmethod
    def from_dict(cls, data: Any) -> SaveStats | None:
        """Parse a recorded entry; None if it is malformed (readers never raise)."""
        if not isinstance(data, dict):
            return None
        try:
            known = {f.name: data[f.name] for f in fields(cls) if f.name in data}
            stats = cls(**known)
            seconds = {str(k): float(v) for k, v in stats.seconds.items()}
            return cls(str(stats.name), int(stats.step), int(stats.bytes), int(stats.peak_held_bytes), seconds,
                       float(stats.blocking_seconds))
        except (TypeError, ValueError, AttributeError):
            return None


class PhaseTimer:
    """Times consecutive phases: `lap("write")` charges the time since the previous lap to "write"."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def since_lap(self) -> float:
        return time.perf_counter() - self._last

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


class StepClock:
    """Mean seconds per training step: wall time between step ends, less the time spent saving."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._last_end: float | None = None
        self._excluded = 0.0

    def restart(self) -> None:
        """A new `train()`: the time before its first step end is not a step."""
        self._last_end, self._excluded = None, 0.0

    def step_end(self, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if self._last_end is not None:
            self.samples.append(max(now - self._last_end - self._excluded, 0.0))
        self._last_end, self._excluded = now, 0.0

    def exclude(self, seconds: float) -> None:
        """Time spent saving since the last step end, which is not a cost of the step."""
        self._excluded += seconds

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None
