"""A run's claim on its output_dir, made by the publisher at `on_train_begin`, before any step.

Order: a writable directory, the run lock, recovery of what a crash or failed clean-up left, the
checkpoints an earlier run left, then room for `keep_last + 1` checkpoints. Each failure raises a
`CheckpointError` naming the fix, and releases the lock it took.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from .._errors import CheckpointError
from .._format.manifest import EXISTING_POLICIES
from .._format.readers import complete_checkpoints
from . import files, generation_config
from .commit import Leftovers
from .lock import RunLock
from .plan import WritePlan
from .prepare import measure_small_files
from .settings import SaveSettings

logger = logging.getLogger(__name__)

__all__ = ["EXISTING_POLICIES", "claim_output_dir"]


def claim_output_dir(settings: SaveSettings, plan: WritePlan, saved_module: nn.Module, resume_step: int,
                     existing: str, leftovers: Leftovers) -> tuple[RunLock, int]:
    """Publisher-only: take the lock and prepare `output_dir` for this run; returns the held lock and the
    measured bytes of the small files a checkpoint of `plan` carries."""
    files.ensure_writable(settings.output_dir)
    lock = RunLock(settings.output_dir)
    lock.acquire()
    try:
        leftovers.report(files.recover(settings.output_dir))
        _check_earlier_checkpoints(settings.output_dir, resume_step, existing)
        config = generation_config.build(settings.generation_config, saved_module, settings.tokenizer)
        small_files = measure_small_files(settings, plan, config)
        _check_room(settings, plan.stored_bytes + small_files)
    except BaseException:
        lock.release()
        raise
    return lock, small_files


def _check_earlier_checkpoints(output_dir: Path, resume_step: int, existing: str) -> None:
    """A fresh run must not mix its checkpoints with an earlier run's: same names, one retention."""
    later = [path.name for path, manifest in complete_checkpoints(output_dir) if manifest["step"] > resume_step]
    if not later:
        return
    if resume_step == 0 and existing == "error":
        raise CheckpointError(
            f"output_dir {output_dir} already holds checkpoints of an earlier run ({', '.join(later)}) and this run "
            "starts at step 0: its step_N would replace theirs and retention would mix both runs. Resume that run "
            "(trainer.train(resume_from_checkpoint=...)), choose a new output_dir, move those checkpoints away, or "
            "pass CheckpointCallback(..., existing_checkpoints='supersede') to let this run replace and prune them"
        )
    logger.warning(
        "output_dir %s holds checkpoints of an earlier run past step %d (%s): this run's checkpoints rank newer "
        "(latest_checkpoint returns them once written), same-named ones are replaced, and retention prunes the "
        "earlier run's first", output_dir, resume_step, ", ".join(later),
    )


def _check_room(settings: SaveSettings, per_copy: int) -> None:
    copies = settings.keep_last + 1 if settings.keep_last is not None else 1
    free = files.free_bytes(settings.output_dir)
    if free >= copies * per_copy:
        return
    why = (f"keep_last={settings.keep_last} checkpoints plus the next one, written before the oldest is pruned"
           if settings.keep_last is not None else "the next checkpoint (keep_last=None keeps all of them)")
    raise CheckpointError(
        f"not enough disk space in {settings.output_dir}: room is reserved for {copies} checkpoint(s) ({why}) of "
        f"about {per_copy:,} bytes each, {copies * per_copy:,} bytes, but only {free:,} are free; free some space, "
        "lower keep_last, or choose another output_dir"
    )
