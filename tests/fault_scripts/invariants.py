"""What must hold in an output_dir after any crash: checked by the crash and kill tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from open_instruct_ckpt._format.manifest import MANIFEST_NAME, is_checkpoint_name
from open_instruct_ckpt._format.readers import read_manifest, verify_checkpoint

TEMPORARY_PREFIXES = (".tmp-", ".old-", ".trash-")
_loaded_ok: set[str] = set()


def temporaries(output_dir: Path) -> list[str]:
    return sorted(p.name for p in Path(output_dir).iterdir() if p.name.startswith(TEMPORARY_PREFIXES))


def listing(output_dir: Path) -> list[tuple[str, int, int]]:
    """Every path under `output_dir` with its inode and size: equal before and after a reader ran."""
    return sorted((str(p), p.lstat().st_ino, p.lstat().st_size) for p in Path(output_dir).rglob("*"))


def checkpoint_names(output_dir: Path) -> list[str]:
    return sorted(p.name for p in Path(output_dir).iterdir() if is_checkpoint_name(p.name))


def orphans(output_dir: Path) -> list[str]:
    """`.old-<name>-<id>` copies whose `<name>` is missing (a crash between the two renames)."""
    root = Path(output_dir)
    return [n for n in temporaries(root) if n.startswith(".old-") and not (root / n[5:-13]).exists()]


def checkpoint_problems(output_dir: Path) -> list[str]:
    """Every directory under a checkpoint name must be complete and load with the stock loaders."""
    problems = []
    for name in checkpoint_names(output_dir):
        path = Path(output_dir) / name
        if read_manifest(path) is None:
            problems.append(f"{name}: no valid manifest under a checkpoint name")
            continue
        problems += [f"{name}: {p}" for p in verify_checkpoint(path)]
        problems += [f"{name}: {p}" for p in _load_problems(path)]
    return problems


def _load_problems(path: Path) -> list[str]:
    # verify_checkpoint re-hashed every file; identical bytes already loaded once need no reload.
    key = hashlib.sha256((path / MANIFEST_NAME).read_bytes()).hexdigest()
    if key in _loaded_ok:
        return []
    try:
        AutoModelForCausalLM.from_pretrained(path)
        AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # reported, not raised: the test lists every failure
        return [f"stock loader failed: {type(exc).__name__}: {exc}"]
    _loaded_ok.add(key)
    return []
