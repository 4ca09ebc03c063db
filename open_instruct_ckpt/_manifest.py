"""The completion manifest (`checkpoint.json`) and everything that reads checkpoints through it.

A directory is a checkpoint only if its manifest parses and lists files that exist with the
recorded sizes. The manifest is written last, so anything without one is incomplete.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

MANIFEST_NAME = "checkpoint.json"
FORMAT = "open_instruct_ckpt/1"
FINAL_NAME = "final"
STEP_PATTERN = re.compile(r"step_(\d+)")
_CHUNK = 16 * 1024 * 1024


def step_name(step: int) -> str:
    return f"step_{step}"


def is_checkpoint_name(name: str) -> bool:
    return name == FINAL_NAME or STEP_PATTERN.fullmatch(name) is not None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(directory: Path, known_sha256: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under `directory`, keyed by relative POSIX path.

    Files in `known_sha256` (hashed while they were written) are not read again.
    """
    known = known_sha256 or {}
    entries = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative != MANIFEST_NAME:
            digest = known.get(relative) or sha256_file(path)
            entries[relative] = {"bytes": path.stat().st_size, "sha256": digest}
    return entries


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a complete checkpoint, or None if `directory` is not one."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    if not isinstance(manifest.get("step"), int) or not isinstance(manifest.get("files"), dict):
        return None
    return manifest if _sizes_match(Path(directory), manifest["files"]) else None


def _sizes_match(directory: Path, files: dict[str, Any]) -> bool:
    for relative, entry in files.items():
        path = directory / relative
        if not _inside(directory, path) or not path.is_file() or path.stat().st_size != entry.get("bytes"):
            return False
    return True


def _inside(directory: Path, path: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def complete_checkpoints(output_dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """Complete checkpoints directly under `output_dir`, oldest first (manifest step; `final` last on a tie)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink() and is_checkpoint_name(child.name):
            manifest = read_manifest(child)
            if manifest is not None:
                found.append((child, manifest))
    return sorted(found, key=lambda item: (item[1]["step"], item[0].name == FINAL_NAME, item[0].name))


def verify_checkpoint(path: str | Path) -> list[str]:
    """Re-read a checkpoint against its manifest; returns the problems found (empty when sound)."""
    directory = Path(path)
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{directory / MANIFEST_NAME}: missing or unreadable manifest ({exc})"]
    problems = []
    for relative, entry in files.items():
        problems += _verify_file(directory, relative, entry)
    return problems


def _verify_file(directory: Path, relative: str, entry: dict[str, Any]) -> list[str]:
    path = directory / relative
    if not _inside(directory, path):
        return [f"{relative}: path escapes the checkpoint directory"]
    if not path.is_file():
        return [f"{relative}: missing"]
    problems = []
    if relative.endswith(".safetensors"):
        problems += [f"{relative}: {p}" for p in safetensors_header_problems(path)]
    size = path.stat().st_size
    if size != entry.get("bytes"):
        return [f"{relative}: size {size} bytes, manifest says {entry.get('bytes')}", *problems]
    if sha256_file(path) != entry.get("sha256"):
        problems.append(f"{relative}: sha256 mismatch")
    return problems


def safetensors_header_problems(path: Path) -> list[str]:
    """Check a safetensors file's header and that every tensor's data lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return ["truncated safetensors header (file shorter than 8 bytes)"]
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            return [f"truncated safetensors header ({header_len} header bytes declared, {size - 8} present)"]
        try:
            header = json.loads(handle.read(header_len))
        except ValueError:
            return ["corrupt safetensors header (not JSON)"]
    data_bytes = size - 8 - header_len
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if ends and max(ends) > data_bytes:
        return [f"truncated safetensors data ({max(ends)} bytes declared, {data_bytes} present)"]
    return []
