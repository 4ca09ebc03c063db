"""The writer's view of a run's checkpoint economics: measure, advise, log, record.

It keeps each save's statistics and the step clock, turns them into `_advisor` advice when a
failure rate is given, logs that advice once it is stable and at train end, and records it all
beside the checkpoints (`RUN_RECORD_NAME`, JSON) for `open-instruct-ckpt advise RUN_DIR`.
Recording is best-effort: it runs after checkpoints are published, so it only warns.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .._format.manifest import RUN_RECORD_FORMAT, RUN_RECORD_NAME
from . import advisor as _advisor
from .stats import SaveStats, StepClock

logger = logging.getLogger(__name__)

STABLE_CHANGE = 0.2  # the optimum moved by at most this fraction between the last two saves


class RunEconomics:
    """Writer-only measurements and advice for one run (other ranks keep an idle instance)."""

    def __init__(self, mtbf_hours: float | None, failure_probability: float | None) -> None:
        self.mtbf_hours = mtbf_hours
        self.failure_probability = failure_probability
        self.clock = StepClock()
        self.saves: list[SaveStats] = []
        self._optima: list[int] = []
        self._logged_stable = False
        self._record_failed = False
        self._facts: dict[str, Any] = {}
        self._output_dir: Path | None = None
        self._keep_last: int | None = None

    def start(self, output_dir: Path, keep_last: int | None, facts: dict[str, Any]) -> None:
        """A `train()` begins: measurements restart with it; `facts` go into the run record as they are."""
        self.clock = StepClock()
        self.saves, self._optima, self._logged_stable = [], [], False
        self._output_dir, self._keep_last, self._facts = output_dir, keep_last, facts

    def saved(self, stats: SaveStats, total_steps: int, interval: int) -> _advisor.Advice | None:
        """Writer, after a step save: keep its statistics, advise, log once stable, record; returns the advice."""
        self.saves.append(stats)
        advice = self._update(total_steps, interval)
        self._log_if_stable(advice)
        return advice

    def finish(self, total_steps: int, interval: int) -> None:
        """Writer, at train end: log the advice and record the run once more."""
        advice = self._update(total_steps, interval)
        if advice is not None:
            logger.info("Checkpoint economics at train end (%d saves measured):\n%s", len(self.saves),
                        _advisor.summary(advice))

    def _update(self, total_steps: int, interval: int) -> _advisor.Advice | None:
        costs = self.costs(total_steps, self._keep_last)
        advice = _advisor.advise(costs, interval) if costs is not None else None
        if self._output_dir is not None:
            facts = {"total_steps": total_steps, "current_interval": interval, "keep_last": self._keep_last}
            self._record(self._output_dir, {**self._facts, **facts}, advice)
        return advice

    def costs(self, total_steps: int, keep_last: int | None) -> _advisor.Costs | None:
        """The measured costs, once a save and a step have been timed and a failure rate is given."""
        step = self.clock.mean
        if not self.saves or step is None or step <= 0:
            return None
        if self.mtbf_hours is None and self.failure_probability is None:
            return None
        return _advisor.Costs(
            save_seconds=sum(s.blocking_seconds for s in self.saves) / len(self.saves), step_seconds=step,
            mtbf_hours=self.mtbf_hours, failure_probability=self.failure_probability, total_steps=total_steps,
            checkpoint_bytes=self.saves[-1].bytes, keep_last=keep_last,
        )

    def _log_if_stable(self, advice: _advisor.Advice | None) -> None:
        """Log the advice the first time the optimum holds still between two saves."""
        if advice is None:
            return
        self._optima.append(advice.optimal.steps)
        if self._logged_stable or len(self._optima) < 2:
            return
        previous, latest = self._optima[-2:]
        if abs(latest - previous) <= STABLE_CHANGE * max(previous, 1):
            self._logged_stable = True
            logger.info("Checkpoint economics (estimates stable after %d saves):\n%s", len(self.saves),
                        _advisor.summary(advice))

    def _record(self, output_dir: Path, facts: dict[str, Any], advice: _advisor.Advice | None) -> None:
        """Best-effort: write the run record atomically beside the checkpoints; warn once on failure."""
        record = {
            "format": RUN_RECORD_FORMAT, "updated_unix": time.time(), **facts,
            "mtbf_hours": self.mtbf_hours, "failure_probability": self.failure_probability,
            "mean_step_seconds": self.clock.mean, "steps_timed": len(self.clock.samples),
            "saves": [s.to_dict() for s in self.saves], "advice": advice.to_dict() if advice is not None else None,
        }
        try:
            _write_atomically(output_dir / RUN_RECORD_NAME, json.dumps(record, indent=2) + "\n")
        except Exception as exc:  # after the commit point: nothing may stop training
            if not self._record_failed:
                logger.warning("Could not record save statistics in %s (%s); checkpoints are not affected",
                               output_dir / RUN_RECORD_NAME, exc)
            self._record_failed = True


def recorded_costs(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The advisor's inputs as a run recorded them (`Costs` fields plus `current_interval`); None if unusable."""
    saves = (record or {}).get("saves")
    saves = [s for s in saves if isinstance(s, dict)] if isinstance(saves, list) else []
    recorded = [s.get("blocking_seconds") for s in saves]
    blocking = [float(b) for b in recorded if type(b) in (int, float) and abs(b) <= sys.float_info.max]
    if record is None or not saves or len(blocking) != len(saves):
        return None
    return {
        "save_seconds": sum(blocking) / len(blocking), "step_seconds": record.get("mean_step_seconds"),
        "mtbf_hours": record.get("mtbf_hours"), "failure_probability": record.get("failure_probability"),
        "total_steps": record.get("total_steps"), "keep_last": record.get("keep_last"),
        "checkpoint_bytes": saves[-1].get("bytes"), "current_interval": record.get("current_interval"),
    }


def _write_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
