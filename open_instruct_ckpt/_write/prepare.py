"""The first phase of a save: the publisher's checks and its staging directory, before any collective gather.

Every check that can fail on the publisher runs here and its verdict is shared with every rank, so a
bad disk never leaves the other ranks waiting in a gather. With writers="all" every rank then proves
it can write in the publisher's staging directory (a shared filesystem), again with a shared verdict.
"""

from __future__ import annotations

import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .._dist import from_rank_zero, raise_on_all_ranks
from .._errors import CheckpointError, explained
from . import files, generation_config
from .executor import write_small_files
from .plan import WritePlan
from .roles import Team
from .settings import SaveSettings

SMALL_FILES_MARGIN = 256 * 1024  # beyond the measured small files: safetensors headers, the manifest
SHARED_FIX = ("writers='all' needs output_dir on a filesystem shared by every rank and writable from each; "
              "use writers='main' (rank 0 writes every file; on node-local disks add save_on_each_node=True for a "
              "copy on each node)")


@dataclass(frozen=True)
class Staged:
    directory: Path  # the publisher's staging directory (every writer's, with writers="all")
    generation_config: Any  # the publisher's, built and validated for this save
    expected_bytes: int


def prepare(settings: SaveSettings, team: Team, plan: WritePlan, name: str, generation_module: nn.Module,
            small_files_bytes: int | None) -> Staged | None:
    """Collective: the publisher's checks and staging directory; returns what this rank writes into, or None."""
    staged, error = None, None
    if team.publishes:
        try:
            staged = _prepare(settings, plan, name, generation_module, small_files_bytes)
        except Exception as exc:
            error = explained(exc, settings.output_dir / name)
    try:
        raise_on_all_ranks(error)
    except BaseException:  # another node's publisher failed (save_on_each_node): this one's staging goes too
        files.discard(staged.directory if staged is not None else None)
        raise
    if not team.shares_files:
        return staged
    directory = Path(from_rank_zero(str(staged.directory) if staged is not None else ""))
    try:
        probe_writable(directory)
    except Exception as exc:
        error = exc
    try:
        raise_on_all_ranks(error)
    except BaseException:
        files.discard(staged.directory if staged is not None else None)
        raise
    return staged if staged is not None else Staged(directory, None, 0)


def _prepare(settings: SaveSettings, plan: WritePlan, name: str, generation_module: nn.Module,
             small_files_bytes: int | None) -> Staged:
    """Publisher: the generation config, then free space (writes nothing), then the staging directory."""
    config = generation_config.build(settings.generation_config, generation_module, settings.tokenizer)
    if small_files_bytes is None:
        small_files_bytes = measure_small_files(settings, plan, config)
    needed, free = plan.stored_bytes + small_files_bytes, files.free_bytes(settings.output_dir)
    if free < needed:
        raise CheckpointError(
            f"not enough disk space in {settings.output_dir}: checkpoint {name} needs about {needed:,} bytes but "
            f"only {free:,} are free; free some space, lower keep_last, or choose another output_dir"
        )
    return Staged(files.create_staging(settings.output_dir, name), config, needed)


def measure_small_files(settings: SaveSettings, plan: WritePlan, config: Any) -> int:
    """Bytes of the tokenizer and configs a checkpoint of `plan` carries, measured by writing them to a temp dir."""
    with tempfile.TemporaryDirectory(prefix="open_instruct_ckpt-size-", ignore_cleanup_errors=True) as scratch:
        write_small_files(plan, Path(scratch), settings.tokenizer, config)
        measured = sum(p.stat().st_size for p in Path(scratch).rglob("*") if p.is_file())
    return measured + SMALL_FILES_MARGIN


def probe_writable(directory: Path) -> None:
    """This rank can create a file in `directory` (made by rank 0): a filesystem shared by every rank."""
    if not directory.is_dir():
        raise CheckpointError(f"writers='all': directory {directory} (created by rank 0) is not visible on this "
                              f"rank; {SHARED_FIX}")
    probe = directory / f".probe-{uuid.uuid4().hex[:12]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"writers='all': this rank cannot write in {directory} ({exc}); {SHARED_FIX}") from exc


def check_shared_output_dir(output_dir: Path, team: Team) -> None:
    """Collective, at on_train_begin with writers="all": every rank proves it can write in a directory rank 0 made
    in output_dir, so storage that is not shared fails before training, on every rank, with the fix."""
    probe, error = None, None
    if team.publishes:
        try:
            probe = files.create_staging(output_dir, "probe")
        except OSError as exc:
            error = explained(exc, output_dir)
    directory = Path(from_rank_zero(str(probe) if probe is not None else ""))
    try:
        if error is None:
            probe_writable(directory)
    except Exception as exc:
        error = exc
    try:
        raise_on_all_ranks(error)
    finally:
        files.discard(probe)
