"""The completion manifest (`checkpoint.json`): its names, its schema, and how the writer fills it.

A directory is a checkpoint only if its manifest is valid and lists files that exist with the
recorded sizes. The manifest is written last, so anything without one is incomplete.
`_readers.py` reads manifests; this module names things and gives the writer the fields and file
entries to write.
"""

from __future__ import annotations

import functools
import re
import sys
import time
from pathlib import Path
from typing import Any

from . import digest

MANIFEST_NAME = "checkpoint.json"
FORMAT = "open_instruct_ckpt/2"  # /2: files carry blake3 digests
READABLE_FORMATS = ("open_instruct_ckpt/1", FORMAT)  # /1: sha256 digests
FINAL_NAME = "final"
STEP_PATTERN = re.compile(r"step_(\d+)")
TEMPORARY_PATTERN = re.compile(r"\.(tmp|old|trash)-(.+)-[0-9a-f]{12}")
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors")
WEIGHT_SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
INDEX_NAME = "model.safetensors.index.json"
RUN_RECORD_NAME = ".open_instruct_ckpt.run.json"  # the run's save statistics and advice, beside its checkpoints
RUN_RECORD_FORMAT = "open_instruct_ckpt-run/1"
EXISTING_POLICIES = ("error", "supersede")  # what a run starting at step 0 does with an earlier run's checkpoints
_VERSIONED = ("open_instruct_ckpt", "torch", "transformers", "safetensors", "peft", "deepspeed", "accelerate")


def step_name(step: int) -> str:
    return f"step_{step}"


def is_checkpoint_name(name: str) -> bool:
    return name == FINAL_NAME or STEP_PATTERN.fullmatch(name) is not None


def manifest_fields(name: str, step: int, strategy: str, run_id: str, run_started_unix: float) -> dict[str, Any]:
    """Writer-side: everything a manifest records but its `files` and `stats`."""
    return {
        "format": FORMAT,
        "name": name,
        "step": step,
        "strategy": strategy,
        "run_id": run_id,
        "run_started_unix": run_started_unix,
        "versions": _versions(),
        "created_unix": time.time(),
    }


@functools.lru_cache(maxsize=None)  # reading package metadata costs ~25 ms a save; it cannot change mid-run
def _installed_versions(deepspeed_loaded: bool) -> tuple[tuple[str, str], ...]:
    from importlib import metadata  # ~45 ms of imports the command line does not need

    versions = {}
    for package in _VERSIONED:
        if package == "deepspeed" and not deepspeed_loaded:
            continue
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return tuple(versions.items())


def _versions() -> dict[str, str]:
    return dict(_installed_versions("deepspeed" in sys.modules))


def describe_files(directory: Path, known: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Writer-side: size and blake3 of every file under `directory`, keyed by relative POSIX path.

    Files in `known` (hashed while they were written) are not read again.
    """
    known = known or {}
    entries = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative != MANIFEST_NAME:
            entries[relative] = {"bytes": path.stat().st_size, "blake3": known.get(relative) or digest.of_file(path)}
    return entries


def has_weights(files: dict[str, Any]) -> bool:
    """Whether a manifest's file list holds model or adapter weights (one file, or an index and its shards)."""
    if any(name in files for name in WEIGHT_FILES):
        return True
    return INDEX_NAME in files and any(WEIGHT_SHARD_PATTERN.fullmatch(name) for name in files)


def order_key(name: str, manifest: dict[str, Any]) -> tuple:
    """Oldest first: by the run that wrote it (a later run wins), then step, then `final` on a tie."""
    started = manifest.get("run_started_unix")
    started = float(started) if isinstance(started, (int, float)) and not isinstance(started, bool) else 0.0
    return (started, manifest["step"], manifest.get("name") == FINAL_NAME or name == FINAL_NAME, name)
