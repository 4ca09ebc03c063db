"""Readers behind `open-instruct-ckpt list` and `inspect`: what is on disk, described, never trusted.

Like `_readers.py`: every public function answers for any input; it never raises, blocks or
modifies, reads regular files only (no symlinks) and imports nothing heavy. Nothing here hashes
file contents: `verify_checkpoint` does that.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .manifest import (
    FINAL_NAME,
    MANIFEST_NAME,
    RUN_RECORD_FORMAT,
    RUN_RECORD_NAME,
    STEP_PATTERN,
    TEMPORARY_PATTERN,
    has_weights,
    is_checkpoint_name,
    order_key,
)
from .readers import (
    _MAX_JSON_BYTES,
    Unreadable,
    _load_json,
    _read_all,
    _size_problem,
    covering_manifest,
    latest_checkpoint,
    open_inside,
)
from .safetensors_header import read_safetensors_header


@dataclass
class Entry:
    """One checkpoint directory (or a save in progress) in an output directory."""

    name: str
    path: Path
    step: int | None
    bytes: int
    complete: bool
    problem: str | None = None
    latest: bool = False
    linked_from: str | None = None
    order: tuple = ()


# -- small safe reads -------------------------------------------------------------------------------

def read_json(directory: Path, relative: str) -> Any | None:
    """The parsed JSON file `directory/relative`, or None when it is missing, unreadable or not JSON."""
    try:
        fd = open_inside(directory, relative)
    except Unreadable:
        return None
    try:
        return _load_json(_read_all(fd, _MAX_JSON_BYTES))
    except (Unreadable, OSError):
        return None
    finally:
        os.close(fd)


def safetensors_header(directory: Path, relative: str) -> dict[str, Any] | None:
    """The JSON header of a safetensors file, or None when it cannot be read as one."""
    try:
        fd = open_inside(directory, relative)
    except Unreadable:
        return None
    try:
        read = read_safetensors_header(fd, os.fstat(fd).st_size)
        return None if isinstance(read, str) else read[0]
    except OSError:
        return None
    finally:
        os.close(fd)


def disk_bytes(directory: Path) -> int:
    """Bytes of the regular files under `directory`, symlinks not followed; what cannot be read counts 0."""
    total = 0
    try:
        with os.scandir(directory) as scan:
            for entry in scan:
                if entry.is_dir(follow_symlinks=False):
                    total += disk_bytes(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    except OSError:
        pass
    return total


def read_run_record(output_dir: str | Path) -> dict[str, Any] | None:
    """The run's recorded save statistics and advice (`RUN_RECORD_NAME`), or None."""
    record = read_json(Path(output_dir), RUN_RECORD_NAME)
    return record if isinstance(record, dict) and record.get("format") == RUN_RECORD_FORMAT else None


# -- the state of a checkpoint ----------------------------------------------------------------------

def manifest_and_problem(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The manifest and None when the checkpoint is complete; else what is wrong (and the manifest, if valid)."""
    try:
        manifest = covering_manifest(directory)
    except Unreadable as exc:
        return None, f"{MANIFEST_NAME}: {exc}"
    for name, entry in manifest["files"].items():
        problem = _size_problem(directory, name, entry["bytes"])
        if problem:
            return manifest, problem
    return manifest, None


def _entry(name: str, path: Path, in_progress: bool, checkpoint_name: str) -> Entry:
    manifest, problem = manifest_and_problem(path)
    match = STEP_PATTERN.fullmatch(checkpoint_name)
    step = manifest["step"] if manifest else int(match.group(1)) if match else None
    if in_progress:
        problem = "being written, or left by an interrupted save"
    complete = problem is None and manifest is not None
    size = sum(e["bytes"] for e in manifest["files"].values()) if complete and manifest else disk_bytes(path)
    linked = manifest.get("linked_from") if manifest else None
    order = order_key(name, manifest) if complete and manifest else (math.inf, step or 0, name == FINAL_NAME, name)
    return Entry(name, path, step, size, complete, problem, False, linked if isinstance(linked, str) else None, order)


def list_checkpoints(output_dir: str | Path) -> list[Entry]:
    """Every checkpoint directory and save in progress under `output_dir`, oldest first, latest marked.

    Complete checkpoints are ordered as `complete_checkpoints` orders them; incomplete ones come
    after them, by step.
    """
    root = Path(output_dir)
    found = []
    try:
        with os.scandir(root) as scan:
            names = [(e.name, e.is_dir(follow_symlinks=False)) for e in scan]
    except OSError:
        return []
    for name, is_dir in names:
        temporary = TEMPORARY_PATTERN.fullmatch(name)
        if is_dir and is_checkpoint_name(name):
            found.append(_entry(name, root / name, False, name))
        elif is_dir and temporary and temporary.group(1) == "tmp" and is_checkpoint_name(temporary.group(2)):
            found.append(_entry(name, root / name, True, temporary.group(2)))
    found.sort(key=lambda e: e.order)
    latest = latest_checkpoint(root)
    for entry in found:
        entry.latest = latest is not None and entry.path == latest
    return found


# -- one checkpoint, described ----------------------------------------------------------------------

def describe(path: str | Path) -> dict[str, Any]:
    """What `inspect` shows: completeness, step, strategy, files, weights, configs, tokenizer, final/ links."""
    directory = Path(path)
    manifest, problem = manifest_and_problem(directory)
    files = {n: e["bytes"] for n, e in manifest["files"].items()} if manifest else _files_on_disk(directory)
    info: dict[str, Any] = {
        "path": str(directory), "complete": manifest is not None and problem is None, "problem": problem,
        "step": manifest and manifest.get("step"), "strategy": manifest and manifest.get("strategy"),
        "run_id": manifest and manifest.get("run_id"), "created_unix": manifest and manifest.get("created_unix"),
        "files": files, "total_bytes": sum(files.values()), "save_stats": manifest and manifest.get("stats"),
        "weights": weights(directory, {n: size for n, size in files.items() if "/" not in n}),
        "config": _config(directory), "generation_config": _generation(directory), "tokenizer": _tokenizer(directory),
        "adapter": _adapter(directory), "linked_from": manifest and manifest.get("linked_from"),
        "final_links_here": _final_links_here(directory), "part_of": manifest and manifest.get("part_of"),
        "models_inside": {sub: _model_inside(directory, sub, files) for sub in models_inside(files)},
    }
    return info


def models_inside(files: dict[str, Any]) -> list[str]:
    """Sub-directories among a checkpoint's files that hold a model of their own (merged LoRA's `merged/`)."""
    subs = sorted({name.split("/", 1)[0] for name in files if "/" in name})
    return [sub for sub in subs if has_weights({n[len(sub) + 1:]: 0 for n in files if n.startswith(f"{sub}/")})]


def _model_inside(directory: Path, sub: str, files: dict[str, int]) -> dict[str, Any]:
    inside = {name: size for name, size in files.items() if name.startswith(f"{sub}/")}
    return {"weights": weights(directory, inside), "config": _config(directory, f"{sub}/config.json")}


def _files_on_disk(directory: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    try:
        for path in sorted(directory.rglob("*")):
            if path.is_file() and not path.is_symlink() and path.name != MANIFEST_NAME:
                found[path.relative_to(directory).as_posix()] = path.stat().st_size
    except OSError:
        pass
    return found


def weights(directory: Path, files: dict[str, int]) -> dict[str, Any] | None:
    """Parameter count and dtypes of the safetensors files, from their headers (no tensor data read)."""
    parameters, tensors, dtypes = 0, 0, set()
    for name in sorted(n for n in files if n.endswith(".safetensors")):
        header = safetensors_header(directory, name) or {}
        for key, entry in header.items():
            shape = entry.get("shape") if isinstance(entry, dict) and key != "__metadata__" else None
            if isinstance(shape, list) and all(isinstance(d, int) for d in shape):
                parameters, tensors = parameters + math.prod(shape), tensors + 1
                dtypes.add(str(entry.get("dtype")))
    return {"parameters": parameters, "tensors": tensors, "dtypes": sorted(dtypes)} if tensors else None


def _config(directory: Path, relative: str = "config.json") -> dict[str, Any] | None:
    config = read_json(directory, relative)
    if not isinstance(config, dict):
        return None
    dtype = config.get("dtype", config.get("torch_dtype"))
    return {"architectures": config.get("architectures"), "model_type": config.get("model_type"), "dtype": dtype}


def _generation(directory: Path) -> dict[str, Any] | None:
    config = read_json(directory, "generation_config.json")
    if not isinstance(config, dict):
        return None
    eos = config.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    tokens = _token_names(directory, [i for i in eos_ids if isinstance(i, int)])
    return {
        "eos_token_id": eos_ids, "eos_tokens": [tokens.get(i) for i in eos_ids],
        "bos_token_id": config.get("bos_token_id"), "pad_token_id": config.get("pad_token_id"),
    }


def _token_names(directory: Path, ids: list[int]) -> dict[int, str]:
    tokenizer = read_json(directory, "tokenizer.json")
    if not isinstance(tokenizer, dict) or not ids:
        return {}
    names: dict[int, str] = {}
    for token in tokenizer.get("added_tokens") or []:
        if isinstance(token, dict) and token.get("id") in ids:
            names[token["id"]] = str(token.get("content"))
    vocab = (tokenizer.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        names.update({i: str(t) for t, i in vocab.items() if i in ids and i not in names})
    return names


def _tokenizer(directory: Path) -> dict[str, Any] | None:
    config = read_json(directory, "tokenizer_config.json")
    if not isinstance(config, dict):
        return None
    tokenizer = read_json(directory, "tokenizer.json")
    vocab = (tokenizer.get("model") or {}).get("vocab") if isinstance(tokenizer, dict) else None
    return {
        "class": config.get("tokenizer_class"), "eos_token": config.get("eos_token"),
        "bos_token": config.get("bos_token"), "pad_token": config.get("pad_token"),
        "vocab_size": len(vocab) if isinstance(vocab, (dict, list)) else None,
    }


def _adapter(directory: Path) -> dict[str, Any] | None:
    config = read_json(directory, "adapter_config.json")
    if not isinstance(config, dict):
        return None
    keys = ("peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "target_modules", "modules_to_save")
    return {key: config.get(key) for key in keys}


def _final_links_here(directory: Path) -> bool:
    """Whether the sibling `final/` is a hard-linked copy of this checkpoint."""
    if directory.name == FINAL_NAME:
        return False
    final = read_json(directory.parent, f"{FINAL_NAME}/{MANIFEST_NAME}")
    return isinstance(final, dict) and final.get("linked_from") == directory.name
