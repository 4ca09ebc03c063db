"""One save, start to finish: writer preflight, collective gather, atomic publish, retention.

Every writer-side check that can fail runs before the first collective and its verdict is
shared with all ranks, so a bad disk never leaves the other ranks waiting in a gather.
"""

from __future__ import annotations

import errno
import logging
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import nn

from . import _generation_config, _io
from ._dist import CheckpointError, raise_on_all_ranks
from ._manifest import FORMAT, read_manifest
from .strategies import SaveStrategy

logger = logging.getLogger(__name__)

# Tokenizer, config and manifest files are small next to the weights: a generous fixed allowance.
_SMALL_FILES_ALLOWANCE = 64 * 1024 * 1024
_VERSIONED = ("open_instruct_ckpt", "torch", "transformers", "safetensors", "peft", "deepspeed", "accelerate")


@dataclass
class SaveSettings:
    """What every save of one run shares, fixed when the callback is set up."""

    strategy: SaveStrategy
    tokenizer: Any
    generation_config: _generation_config.GenerationConfigSpec
    output_dir: Path
    keep_last: int | None


def save(settings: SaveSettings, model: nn.Module, name: str, step: int, is_writer: bool) -> Path | None:
    """Collective: save `model` as `<output_dir>/<name>`; returns the path on the writer, None elsewhere."""
    started = time.perf_counter()
    staging, generation_config, error = None, None, None
    if is_writer:
        try:
            generation_config = _generation_config.build(
                settings.generation_config, settings.strategy.saved_module(model), settings.tokenizer
            )
            # Free space first: that check writes nothing, so a full disk leaves output_dir untouched.
            # Creating the staging directory is the writability check; it too precedes every collective.
            _raise_if(_io.free_space_problem(settings.output_dir, _needed_bytes(settings, model)))
            staging = _io.create_staging(settings.output_dir, name)
        except Exception as exc:
            error = _explained(exc, settings.output_dir / name)
    raise_on_all_ranks(error)
    path = None
    try:
        report = settings.strategy.save(model, staging, generation_config)
        if is_writer:
            settings.tokenizer.save_pretrained(str(staging))
            manifest = _manifest(settings, name, step)
            path = _io.publish(staging, settings.output_dir, name, manifest, known_sha256=report.sha256)
            _log_saved(path, time.perf_counter() - started, report.peak_held_bytes)
            _io.prune(settings.output_dir, settings.keep_last, just_saved=path)
    except Exception as exc:
        error = _explained(exc, settings.output_dir / name)
        if is_writer:
            _io.discard(staging)
    raise_on_all_ranks(error)
    return path


_FIXES = {
    errno.ENOSPC: "free disk space (or lower keep_last) on that filesystem",
    errno.EDQUOT: "free space within your disk quota (or lower keep_last)",
    errno.EACCES: "fix the permissions of output_dir or choose another output_dir",
    errno.EPERM: "fix the permissions of output_dir or choose another output_dir",
    errno.EROFS: "choose an output_dir on a writable filesystem",
}


def _explained(exc: Exception, target: Path) -> Exception:
    """An OSError becomes a CheckpointError naming the checkpoint, the failing path and the fix."""
    if not isinstance(exc, OSError):
        return exc
    fix = _FIXES.get(exc.errno, "check the disk and the filesystem under output_dir (see the OS error)")
    error = CheckpointError(
        f"writing checkpoint {target} failed: {exc}. The temporary directory was removed and earlier "
        f"checkpoints are untouched; {fix}, then restart (latest_checkpoint() finds the last complete one)"
    )
    error.__cause__ = exc
    return error


def link_final(settings: SaveSettings, source: Path | None, is_writer: bool) -> Path | None:
    """Collective (failure flag only): publish `final/` as hard links to the checkpoint `source`."""
    path, error, staging = None, None, None
    if is_writer:
        try:
            source_manifest = read_manifest(source)
            if source_manifest is None:
                raise CheckpointError(f"cannot link final/ to {source}: it is not a complete checkpoint")
            staging = _io.create_staging(settings.output_dir, "final")
            _io.hard_link_copy(source, staging)
            manifest = {**source_manifest, "name": "final", "linked_from": source.name}
            path = _io.publish(staging, settings.output_dir, "final", manifest, files=source_manifest["files"])
            logger.info("Linked %s to %s (no new write)", path, source)
        except Exception as exc:
            error = exc
            _io.discard(staging)
    raise_on_all_ranks(error)
    return path


def startup_space_problem(settings: SaveSettings, model: nn.Module) -> str | None:
    """Writer-local: None if `keep_last + 1` checkpoints fit (pruning follows a save), else what to do."""
    copies = settings.keep_last + 1 if settings.keep_last is not None else 1
    return _io.free_space_problem(settings.output_dir, copies * _needed_bytes(settings, model))


def _needed_bytes(settings: SaveSettings, model: nn.Module) -> int:
    return settings.strategy.estimate_bytes(model) + _SMALL_FILES_ALLOWANCE


def _raise_if(problem: str | None) -> None:
    if problem:
        raise CheckpointError(problem)


def _manifest(settings: SaveSettings, name: str, step: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "name": name,
        "step": step,
        "strategy": repr(settings.strategy),
        "versions": _versions(),
        "created_unix": time.time(),
    }


def _versions() -> dict[str, str]:
    versions = {}
    for package in _VERSIONED:
        if package == "deepspeed" and "deepspeed" not in sys.modules:
            continue
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _log_saved(path: Path, seconds: float, peak_held_bytes: int) -> None:
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    logger.info("Saved checkpoint %s: %d bytes in %.2f s (peak %d bytes held)", path, size, seconds, peak_held_bytes)
