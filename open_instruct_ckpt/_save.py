"""One save, in phases: writer checks -> collective gather and write -> publish -> best-effort clean-up.

Every writer-side check that can fail runs before the first collective and its verdict is shared
with all ranks, so a bad disk never leaves the other ranks waiting in a gather. The rename into
place is the commit point: after it nothing may stop training, so the clean-up phase (old copy,
retention, leftovers of earlier clean-ups) only warns.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from . import _generation_config, _io, _progress
from ._dist import any_rank, from_rank_zero, gather_to_all, is_distributed, raise_on_all_ranks
from ._errors import CheckpointError, explained
from ._manifest import FINAL_NAME, describe_files, manifest_fields
from ._readers import read_manifest
from ._shards import ShardShare
from ._stats import PhaseTimer, SaveStats
from .strategies import CheckpointStrategy, WriteReport

logger = logging.getLogger(__name__)

# Beyond the measured tokenizer and configs: safetensors headers, the manifest, PEFT's README.
_SMALL_FILES_MARGIN = 256 * 1024


@dataclass
class Run:
    """Identifies the run in every manifest it writes: readers rank a later run's checkpoints newer."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_unix: float = field(default_factory=time.time)


@dataclass
class SaveSettings:
    """What every save of one run shares, fixed when the callback is set up."""

    strategy: CheckpointStrategy
    tokenizer: Any
    generation_config: _generation_config.GenerationConfigSpec
    output_dir: Path
    keep_last: int | None
    run: Run = field(default_factory=Run)
    small_files_bytes: int = _SMALL_FILES_MARGIN
    reported_leftovers: set[str] = field(default_factory=set)
    show_progress: bool = False  # a bar for saves longer than about a second (off with disable_tqdm)
    last_stats: SaveStats | None = None  # the writer's statistics of its latest save


@dataclass
class _Staged:
    directory: Path
    generation_config: Any
    expected_bytes: int


def save(
    settings: SaveSettings, model: nn.Module, name: str, step: int, is_writer: bool, background: Any = None
) -> Path | None:
    """Collective: save `model` as `<output_dir>/<name>`; returns the path on the writer, None elsewhere.

    On the writer the save's statistics are left in `settings.last_stats` (and its manifest). With
    `background` (an `_async.BackgroundSaver`, async saves) only the snapshot is collective and blocking:
    the writer's persist phase then runs in the background, this returns None on every rank, and the
    verdict comes from `background.take_verdict()` (see `_async`).
    """
    timer = PhaseTimer()
    if getattr(settings.strategy, "writers", "main") == "all" and is_distributed():
        return _save_all_writers(settings, model, name, step, is_writer, timer)
    target = settings.output_dir / name
    staged, error = _prepare_on_writer(settings, model, name, is_writer), None
    timer.lap("prepare")
    if background is not None and _snapshot_to_arena(settings, model, background.arena, is_writer):
        persist = _snapshot(settings, model, staged, target, background.arena)
        if staged is not None:
            blocking = sum(timer.seconds.values()) + timer.since_lap()
            background.start(lambda: _persist(settings, staged, persist, name, step, timer, blocking))
        return None
    published = None
    try:  # sync: the gather writes shards as they fill, then the same persist phase runs inline
        report = _write(settings, model, staged, name)
        if staged is not None:
            published = _persist(settings, staged, lambda: report, name, step, timer)
    except Exception as exc:
        error = explained(exc, target)
        if staged is not None:
            _io.discard(staged.directory)  # a failed gather; _persist already discarded after its own failures
    raise_on_all_ranks(error)
    return published


def _write(settings: SaveSettings, model: nn.Module, staged: _Staged | None, name: str) -> WriteReport:
    """Collective: every rank gathers; the writer (holding `staged`) writes weights and configs."""
    if staged is None:
        return settings.strategy.save(model, None, None)
    with _progress.bar(settings.show_progress, staged.expected_bytes, f"saving {name}"):
        return settings.strategy.save(model, staged.directory, staged.generation_config)


def _save_all_writers(
    settings: SaveSettings, model: nn.Module, name: str, step: int, is_writer: bool, timer: PhaseTimer
) -> Path | None:
    """Collective, FullModel(writers="all"): the publisher (rank 0) stages; every rank proves it can write in that
    staging directory (a shared filesystem) before the first gather, with a shared verdict; every rank writes its
    shard files; the publisher collects every rank's sha256 and seals and publishes only after all succeeded."""
    import torch.distributed as dist

    target = settings.output_dir / name
    staged, error = _prepare_on_writer(settings, model, name, is_writer), None
    timer.lap("prepare")
    directory = Path(from_rank_zero(str(staged.directory) if staged else ""))
    try:
        _probe_writable(directory)
    except Exception as exc:
        error = explained(exc, target)
    _shared_verdict(error, staged)  # every rank can write there: only now the gathers start
    report, share = WriteReport(), ShardShare(dist.get_rank(), dist.get_world_size(), publisher=is_writer)
    try:
        full_model: Any = settings.strategy  # FullModel, the only strategy with writers='all'
        report = full_model.snapshot(model, directory, staged and staged.generation_config, None, share)()
    except Exception as exc:
        error = explained(exc, target)
    _shared_verdict(error, staged)
    sha256 = {file: digest for rank_sha256 in gather_to_all(report.sha256) for file, digest in rank_sha256.items()}
    published = None
    if staged is not None:
        try:
            published = _persist(settings, staged, lambda: WriteReport(report.peak_held_bytes, sha256), name, step,
                                 timer)
        except Exception as exc:
            error = explained(exc, target)
    raise_on_all_ranks(error)
    return published


_SHARED_FIX = "writers='all' needs output_dir on a filesystem shared by every rank and writable from each; " \
              "use FullModel(writers='main') (rank 0 writes every file)"


def _probe_writable(directory: Path) -> None:
    if not directory.is_dir():
        raise CheckpointError(
            f"FullModel(writers='all'): directory {directory} (created by rank 0) is not visible on this rank; "
            f"{_SHARED_FIX}"
        )
    probe = directory / f".probe-{uuid.uuid4().hex[:12]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"FullModel(writers='all'): this rank cannot write in {directory} ({exc}); "
                              f"{_SHARED_FIX}") from exc


def check_all_writers(settings: SaveSettings, is_writer: bool) -> None:
    """Collective, at on_train_begin with writers='all': every rank proves it can write in a directory rank 0 made
    in output_dir, so a filesystem that is not shared fails before training, on every rank, with the fix."""
    probe, error = None, None
    if is_writer:
        try:
            probe = _io.create_staging(settings.output_dir, "probe")
        except OSError as exc:
            error = explained(exc, settings.output_dir)
    directory = Path(from_rank_zero(str(probe) if probe is not None else ""))
    try:
        if error is None:
            _probe_writable(directory)
    except Exception as exc:
        error = exc
    try:
        raise_on_all_ranks(error)
    finally:
        _io.discard(probe)


def _shared_verdict(error: BaseException | None, staged: _Staged | None) -> None:
    """Collective: raise on every rank if any failed; the publisher then discards the staging directory."""
    try:
        raise_on_all_ranks(error)
    except BaseException:
        if staged is not None:
            _io.discard(staged.directory)
        raise


def _snapshot_to_arena(settings: SaveSettings, model: nn.Module, arena: Any, is_writer: bool) -> bool:
    """Collective: whether every rank takes the async path; False (sync, warned) when the writer's host memory
    cannot hold the staging arena."""
    needed = settings.strategy.estimate_bytes(model) if is_writer else 0
    short = is_writer and not arena.fits(needed)
    if any_rank(short):
        if is_writer:
            logger.warning("Saving synchronously: host memory cannot hold the %d-byte async staging arena "
                           "(MemAvailable too low); free host memory or pass async_save=False", needed)
        return False
    if is_writer:
        arena.reset(needed)
    return True


def _snapshot(settings: SaveSettings, model: nn.Module, staged: _Staged | None, target: Path, arena: Any) -> Any:
    """Collective: gather and copy every saved tensor into `arena` on the writer; returns its `persist`."""
    persist, error = None, None
    try:
        if staged is None:
            persist = settings.strategy.snapshot(model, None, None)
        else:
            persist = settings.strategy.snapshot(model, staged.directory, staged.generation_config, arena)
        arena.settle()
    except Exception as exc:
        error = explained(exc, target)
        if staged is not None:
            _io.discard(staged.directory)
    raise_on_all_ranks(error)
    return persist


def _persist(
    settings: SaveSettings, staged: _Staged, write: Any, name: str, step: int, timer: PhaseTimer,
    blocking_seconds: float | None = None,
) -> Path:
    """Writer, inline (sync) or in the background (async): write what is left, tokenizer, seal, publish (the commit
    point), then best-effort clean-up. Before the commit point a failure discards the staging directory and
    raises (explained); the previous checkpoint under `name` is untouched. `blocking_seconds` is what training
    waited for, when that was less than the whole save."""
    try:
        report = write()
        settings.tokenizer.save_pretrained(str(staged.directory))
        published, stats = _seal_and_publish(settings, staged, report, name, step, timer)
    except Exception as exc:
        _io.discard(staged.directory)
        raise explained(exc, settings.output_dir / name)
    timer.lap("publish")
    _clean_up(settings, published)
    timer.lap("cleanup")
    stats.seconds = dict(timer.seconds)
    stats.blocking_seconds = stats.total_seconds if blocking_seconds is None else blocking_seconds
    settings.last_stats = stats
    logger.info("Saved checkpoint %s: %d bytes in %.2f s (peak %d bytes held)",
                published.path, stats.bytes, stats.total_seconds, stats.peak_held_bytes)
    return published.path


def _seal_and_publish(
    settings: SaveSettings, staged: _Staged, report: WriteReport, name: str, step: int, timer: PhaseTimer
) -> tuple[_io.Published, SaveStats]:
    """Writer: the manifest (with the statistics so far) last, then the rename into place."""
    files = describe_files(staged.directory, report.sha256)
    timer.lap("write")
    stats = SaveStats(name, step, sum(e["bytes"] for e in files.values()), report.peak_held_bytes, dict(timer.seconds))
    fields = manifest_fields(name, step, repr(settings.strategy), settings.run.id, settings.run.started_unix)
    _io.seal(staged.directory, {**fields, "stats": stats.in_manifest()}, files=files)
    timer.lap("seal")
    return _io.publish(staged.directory, settings.output_dir, name), stats


def _prepare_on_writer(settings: SaveSettings, model: nn.Module, name: str, is_writer: bool) -> _Staged | None:
    """Collective: the writer's checks and staging directory; a failure there is raised on every rank
    before any gather starts."""
    staged, error = None, None
    if is_writer:
        try:
            staged = _prepare(settings, model, name)
        except Exception as exc:
            error = explained(exc, settings.output_dir / name)
    raise_on_all_ranks(error)
    return staged


def _prepare(settings: SaveSettings, model: nn.Module, name: str) -> _Staged:
    """Writer: the generation config, then free space (writes nothing), then the staging directory."""
    generation_config = _generation_config.build(
        settings.generation_config, settings.strategy.saved_module(model), settings.tokenizer
    )
    needed, free = needed_bytes(settings, model), _io.free_bytes(settings.output_dir)
    if free < needed:
        raise CheckpointError(
            f"not enough disk space in {settings.output_dir}: checkpoint {name} needs about {needed:,} bytes but "
            f"only {free:,} are free; free some space, lower keep_last, or choose another output_dir"
        )
    return _Staged(_io.create_staging(settings.output_dir, name), generation_config, needed)


def link_final(settings: SaveSettings, source: Path | None, is_writer: bool) -> Path | None:
    """Collective (failure flag only): publish `final/` as hard links to the checkpoint `source`."""
    published, error, staging = None, None, None
    if is_writer:
        try:
            source_manifest = read_manifest(source) if source is not None else None
            if source is None or source_manifest is None:
                raise CheckpointError(f"cannot link final/ to {source}: it is not a complete checkpoint")
            staging = _io.create_staging(settings.output_dir, FINAL_NAME)
            _io.hard_link_copy(source, staging)
            manifest = {**source_manifest, "name": FINAL_NAME, "linked_from": source.name}
            manifest.pop("files")
            _io.seal(staging, manifest, files=source_manifest["files"])
            published = _io.publish(staging, settings.output_dir, FINAL_NAME)
        except Exception as exc:
            error = explained(exc, settings.output_dir / FINAL_NAME)
            _io.discard(staging)
    raise_on_all_ranks(error)
    if published is None:
        return None
    logger.info("Linked %s to %s (no new write)", published.path, source)
    _clean_up(settings, published)
    return published.path


def _clean_up(settings: SaveSettings, published: _io.Published) -> None:
    """Writer, after the commit point: never raises; reports what it left behind, once per leftover.

    Pruning only moves checkpoints to the trash; the sweep then deletes the trash, the old copy
    this save replaced, and whatever earlier clean-ups could not remove.
    """
    try:
        left = _io.prune(settings.output_dir, settings.keep_last, just_saved=published.path)
        left.update(_io.sweep(settings.output_dir))
    except Exception as exc:  # the checkpoint is published: a clean-up bug must not end training
        left = {settings.output_dir: f"clean-up failed: {type(exc).__name__}: {exc}"}
    report_leftovers(settings, left)


def report_leftovers(settings: SaveSettings, left: dict[Path, str]) -> None:
    new = {path: why for path, why in left.items() if str(path) not in settings.reported_leftovers}
    settings.reported_leftovers.update(str(path) for path in new)
    if new:
        logger.warning(
            "Checkpoints are safe, but clean-up left behind: %s. Another process may hold these files open "
            "(an evaluation job on NFS) or they sit on a mount point; they are retried at every save, or remove "
            "them by hand (rm -rf PATH) once nothing uses them", "; ".join(f"{p} ({why})" for p, why in new.items()),
        )


# -- sizes --------------------------------------------------------------------------------------

def needed_bytes(settings: SaveSettings, model: nn.Module) -> int:
    """About what one checkpoint of `model` takes: weights plus the measured small files."""
    return settings.strategy.estimate_bytes(model) + settings.small_files_bytes


def measure_small_files(settings: SaveSettings, model: nn.Module) -> int:
    """Bytes of the tokenizer and configs a checkpoint carries, measured by writing them to a temp dir."""
    module = settings.strategy.saved_module(model)
    with tempfile.TemporaryDirectory(prefix="open_instruct_ckpt-size-", ignore_cleanup_errors=True) as scratch:
        settings.tokenizer.save_pretrained(scratch)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(scratch)
        _generation_config.build(settings.generation_config, module, settings.tokenizer).save_pretrained(scratch)
        measured = sum(p.stat().st_size for p in Path(scratch).rglob("*") if p.is_file())
    return measured + _SMALL_FILES_MARGIN
