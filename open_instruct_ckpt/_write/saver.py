"""One Saver per run: `start(...)`, `poll()`, `wait() -> Saved`. Every public method is collective.

A sync save is a start followed by a wait; an async save is the same pipeline with a staging arena: `start`
returns once every saved tensor is copied into the arena (the snapshot), and the rest (write, hash, seal,
publish, clean-up) runs in a background thread on each writer. A failure is raised on every rank by the
`poll` or `wait` that takes the verdict; the previous checkpoint under that name stays intact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .._dist import any_rank, background_group, gather_to_all, is_distributed, raise_on_all_ranks
from .._errors import explained
from .._measure.stats import PhaseTimer, SaveStats
from . import commit, files, nodes, progress, snapshot
from .claim import claim_output_dir
from .executor import Persist, Target, WriteReport, gather
from .lock import RunLock
from .plan import WritePlan
from .prepare import Staged, prepare
from .roles import SOLO, Team
from .settings import SaveSettings
from .staging import Arena, Background

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Saved:
    """A published checkpoint: its path and statistics on a publisher, None elsewhere."""

    name: str
    step: int
    path: Path | None
    stats: SaveStats | None


@dataclass
class _Job:
    name: str
    step: int
    strategy: str
    staged: Staged | None
    persist: Persist | None
    timer: PhaseTimer
    blocking_seconds: float | None = None
    background_since: float = 0.0  # time.monotonic() when its background half started (stall reports)


class Saver:
    def __init__(self, settings: SaveSettings, team: Team, *, async_save: bool = False) -> None:
        """Collective when async in a distributed run (the background saves' own process group)."""
        self.settings, self.team = settings, team
        self.small_files_bytes: int | None = None  # measured by `claim`
        self.leftovers = commit.Leftovers()
        self._background = Background() if async_save else None
        self._arena = Arena() if async_save else None
        self._group, self._publishers = None, [0]
        if async_save and is_distributed():  # background saves gather and combine on their own process group
            self._group = background_group()
            self._publishers = nodes.publishers(team)
        self._done: Saved | None = None  # a sync save's result, until `wait` hands it out
        self._in_flight: _Job | None = None  # the last save started in the background

    def claim(self, plan: WritePlan, saved_module: nn.Module, resume_step: int, existing: str) -> RunLock | None:
        """Collective: the publisher's claim on output_dir (the lock, recovery, earlier runs, room for `keep_last + 1`
        checkpoints of `plan`); a failure is raised on every rank. Returns the held lock on the publisher."""
        lock, error = None, None
        if self.team.publishes:
            try:
                lock, self.small_files_bytes = claim_output_dir(self.settings, plan, saved_module, resume_step,
                                                                existing, self.leftovers)
            except Exception as exc:
                error = exc
        raise_on_all_ranks(error)
        return lock

    @property
    def staging_capacity(self) -> int:
        """Bytes of host memory this rank holds for async snapshots (0 until the first async save)."""
        return self._arena.capacity if self._arena is not None else 0

    @property
    def staging_pinned(self) -> bool:
        """Whether that memory is pinned (page-locked, with CUDA), so device-to-host copies need not block."""
        return self._arena is not None and self._arena.pinned

    @property
    def activity(self) -> tuple[str, str, float] | None:
        """Local: the background save running on this rank, for stall reports: (its name, what it is doing,
        time.monotonic() its background half started); None when none runs."""
        job = self._in_flight
        if job is None or self._background is None or not self._background.in_flight:
            return None
        doing = job.persist.doing() if job.persist is not None else "gathering the shards module by module"
        return job.name, doing, job.background_since

    @property
    def pending(self) -> bool:
        """A save was started and its result not yet taken (same on every rank)."""
        return self._done is not None or (self._background is not None and self._background.pending)

    def start(self, model: nn.Module, name: str, step: int, strategy: Any, *, final: bool = False,
              background: bool = True) -> None:
        """Collective: save what `strategy` plans of `model` as `<output_dir>/<name>`. Take the previous result
        (`wait`) first. Async saves (and `background`) return after the snapshot; the rest runs in the background."""
        if self.pending:
            raise RuntimeError("a save is still pending: wait() for it first")
        timer = PhaseTimer()
        plan = strategy.plan(model, final=final)
        small = self.small_files_bytes if plan.links_to_steps else None
        staged = prepare(self.settings, self.team, plan, name, strategy.saved_module(model), small)
        timer.lap("prepare")
        job = _Job(name, step, repr(strategy), staged, None, timer)
        if background and self._background is not None:
            sharded = self._group is not None and not any_rank(not snapshot.shardable(plan))
            needed = snapshot.arena_bytes(plan, self.team.writes) if sharded else self.team.share_bytes(plan)
            if self._arena_fits(needed):
                self._snapshot(job, plan, sharded, needed)
                return
        job.persist = self._gather(job, plan, copy=None)
        saved, error = self._persist(job)
        raise_on_all_ranks(error)
        self._done = saved

    def save(self, model: nn.Module, name: str, step: int, strategy: Any, *, final: bool = False) -> Saved:
        """Collective: a sync save (start, then wait) of what `strategy` plans; its result."""
        self.start(model, name, step, strategy, final=final, background=False)
        saved = self.wait()
        assert saved is not None
        return saved

    def poll(self) -> Saved | None:
        """Collective: the result once the save in flight is done on every rank; None while it runs."""
        if self._done is not None or self._background is None or not self._background.pending:
            return self.wait()
        if any_rank(self._background.in_flight):
            return None
        return self.wait()

    def wait(self) -> Saved | None:
        """Collective: wait for the pending save; its result, or its error raised on every rank; None if none."""
        if self._done is not None:
            done, self._done = self._done, None
            return done
        if self._background is None or not self._background.pending:
            return None
        saved, error = self._background.result()
        raise_on_all_ranks(error)
        return saved

    def link(self, name: str, source: Saved) -> Saved:
        """Collective: publish `name` as hard links to the checkpoint `source` (the final save after a step save)."""
        published, error = None, None
        if self.team.publishes:
            try:
                assert source.path is not None
                published = commit.link(self.settings, source.path, name)
            except Exception as exc:
                error = explained(exc, self.settings.output_dir / name)
        raise_on_all_ranks(error)
        if published is None:
            return Saved(name, source.step, None, None)
        logger.info("Linked %s to %s (no new write)", published.path, source.path)
        commit.clean_up(self.settings, published, self.leftovers)
        return Saved(name, source.step, published.path, None)

    def close(self) -> None:
        """Wait for a background save without taking its verdict (the run is over; its lock is released next)."""
        if self._background is not None:
            self._background.join()

    # -- phases ----------------------------------------------------------------------------------

    def _target(self, staged: Staged | None, copy=None) -> Target | None:
        if staged is None:
            return None
        config = staged.generation_config
        return Target(staged.directory, self.team.owned, self.team.publishes, self.settings.tokenizer, config, copy)

    def _gather(self, job: _Job, plan: WritePlan, copy) -> Persist | None:
        """Collective: every rank gathers; a failure is raised on every rank, the staging directory discarded."""
        persist, error = None, None
        try:
            expected = job.staged.expected_bytes if job.staged is not None else 0
            with progress.bar(self.settings.show_progress and self.team.publishes, expected, f"saving {job.name}"):
                persist = gather(plan, self._target(job.staged, copy))
                if copy is not None and self._arena is not None:
                    self._arena.settle()
        except Exception as exc:
            error = explained(exc, self.settings.output_dir / job.name)
        self._discard_on_failure(job, error)
        return persist

    def _snapshot(self, job: _Job, plan: WritePlan, sharded: bool, needed: int) -> None:
        """Collective: the blocking half of an async save; the rest runs in the background on every rank. A sharded
        model blocks only for each rank's copy of its own shards; otherwise the gather blocks, copying into the
        arena."""
        assert self._background is not None and self._arena is not None
        self._arena.reset(needed)
        if sharded:
            kept = snapshot.take(plan, self._arena, self.team.writes)
            job.blocking_seconds = sum(job.timer.seconds.values()) + job.timer.since_lap()
            job.background_since, self._in_flight = time.monotonic(), job
            self._background.start(lambda: self._gather_then_persist(job, plan, kept))
            return
        job.persist = self._gather(job, plan, copy=self._arena.copy if self.team.writes else None)
        job.blocking_seconds = sum(job.timer.seconds.values()) + job.timer.since_lap()
        job.background_since, self._in_flight = time.monotonic(), job
        self._background.start(lambda: self._persist(job))

    def _gather_then_persist(self, job: _Job, plan: WritePlan, kept: snapshot.Snapshot) -> tuple[Saved, Any]:
        """Background, every rank: rebuild the snapshot's tensors on the writer(s) and write them, then persist."""
        one_writer = len(self._publishers) == 1 and not self.team.shares_files
        try:
            job.persist = snapshot.gather(plan, kept, self._target(job.staged), self._group,
                                          self._publishers[0] if one_writer else None)
        except Exception as exc:
            job.persist = None
            return self._persist(job, explained(exc, self.settings.output_dir / job.name))
        return self._persist(job)

    def _arena_fits(self, needed: int) -> bool:
        """Collective: whether every rank's host memory holds its arena; else this save runs sync (warned)."""
        short = self._arena is not None and not self._arena.fits(needed)
        if any_rank(short):
            if short:
                logger.warning("Saving synchronously: host memory cannot hold the %d-byte async staging arena "
                               "(MemAvailable too low); free host memory or pass async_save=False", needed)
            return False
        return True

    def _persist(self, job: _Job, error: BaseException | None = None) -> tuple[Saved, BaseException | None]:
        """Every rank, inline (sync) or in the background (async): write what is left, then the publisher seals and
        publishes. Before the commit point a failure discards the staging directory; the previous checkpoint stays.
        A rank that failed earlier (`error`) still takes part in combining the writers' reports."""
        report = WriteReport()
        try:
            if job.persist is not None and error is None:
                report = job.persist()
        except Exception as exc:
            error = explained(exc, self.settings.output_dir / job.name)
        report, error = self._combine(report, error)
        if error is not None or not self.team.publishes or job.staged is None:
            self._discard_on_failure(job, error, shared=False)
            return Saved(job.name, job.step, None, None), error
        try:
            published, stats = commit.seal_and_publish(self.settings, job.staged.directory, report, job.name, job.step,
                                                       job.strategy, job.timer)
        except Exception as exc:
            files.discard(job.staged.directory)
            return Saved(job.name, job.step, None, None), explained(exc, self.settings.output_dir / job.name)
        job.timer.lap("publish")
        commit.clean_up(self.settings, published, self.leftovers)
        job.timer.lap("cleanup")
        return Saved(job.name, job.step, published.path, self._stats(stats, job)), None

    def _combine(self, report: WriteReport, error: BaseException | None) -> tuple[WriteReport, BaseException | None]:
        """writers="all": every writer's digests and failure reach every writer (on the background group when async)."""
        if not self.team.shares_files:
            return report, error
        message = None if error is None else f"{type(error).__name__}: {error}"
        everyone = gather_to_all((report.digests, report.peak_held_bytes, message), group=self._group)
        failed = [(rank, m) for rank, (_, _, m) in enumerate(everyone) if m is not None]
        if failed and error is None:
            from .._errors import CheckpointError

            error = CheckpointError(f"checkpoint save failed on rank {failed[0][0]}: {failed[0][1]}")
        digests = {f: h for rank_digests, _, _ in everyone for f, h in rank_digests.items()}
        return WriteReport(report.peak_held_bytes, digests), error

    def _stats(self, stats: SaveStats, job: _Job) -> SaveStats:
        stats.seconds = dict(job.timer.seconds)
        stats.blocking_seconds = stats.total_seconds if job.blocking_seconds is None else job.blocking_seconds
        logger.info("Saved checkpoint %s/%s: %d bytes in %.2f s (peak %d bytes held)", self.settings.output_dir,
                    job.name, stats.bytes, stats.total_seconds, stats.peak_held_bytes)
        return stats

    def _discard_on_failure(self, job: _Job, error: BaseException | None, shared: bool = True) -> None:
        """On a failure: the publisher discards the staging directory; with `shared`, every rank raises it."""
        if error is not None and job.staged is not None and self.team.publishes:
            files.discard(job.staged.directory)
        if shared:
            raise_on_all_ranks(error)


def save_once(strategy: Any, model: nn.Module, tokenizer: Any, output_dir: Path, name: str = "step_1", step: int = 1,
              *, final: bool = False, keep_last: int | None = None, generation_config: Any = None,
              show_progress: bool = False) -> Saved:
    """One sync save as `<output_dir>/<name>` by a Saver of its own (a new run; no lock, no claim): for tools,
    benchmarks and tests outside a Trainer run."""
    settings = SaveSettings(tokenizer, generation_config, Path(output_dir), keep_last, show_progress=show_progress)
    return Saver(settings, SOLO).save(model, name, step, strategy, final=final)
