"""What the launched worker installs to watch the library: a write audit, a write ban, and a gather spy.

Imported by train_worker.py only (it runs inside the launched ranks, never under pytest).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
from pathlib import Path

from torch import nn
from torch.distributed.tensor import DTensor

import open_instruct_ckpt._engines as _gather

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.mkdir": 1, "os.remove": 1, "os.rmdir": 1, "shutil.rmtree": 1, "os.truncate": 1,
                "os.rename": 2, "os.link": 2, "os.symlink": 2}


# -- proving that non-writers write nothing -------------------------------------------------------

def _under(path, root: str) -> bool:
    if isinstance(path, int) or path is None:
        return False
    full = os.path.abspath(os.fsdecode(path))
    return full == root or full.startswith(root + os.sep)


def install_audit(root: Path, events: list) -> None:
    """Record open-for-write, mkdir, rename, link and remove events under `root` (hooks cannot be removed)."""
    root_text = os.path.abspath(root)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
            if writing and _under(path, root_text):
                events.append([event, os.fsdecode(path)])
        elif event in _PATH_EVENTS:
            paths = [p for p in args[: _PATH_EVENTS[event]] if _under(p, root_text)]
            if paths:
                events.append([event, *map(os.fsdecode, paths)])

    sys.addaudithook(hook)


def forbid_file_writes(probe: Path) -> str:
    """Set RLIMIT_FSIZE to 0 for this process; return how a 1-byte probe write failed (expected: EFBIG)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        with open(probe, "wb") as handle:
            handle.write(b"x")
            handle.flush()
    except OSError as exc:
        return os.strerror(exc.errno)
    return "write succeeded"


def allow_file_writes() -> None:
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))


# -- what the library gathers, and how much at once -------------------------------------------------

_open_gathers: list[int] = []  # bytes materialised so far by each engine gather in progress


def spy_on_gathers(model: nn.Module, gathered: list, gather_bytes: list, deepspeed: bool) -> None:
    """Wrap each engine's gather at the seam (the real one still runs).

    `gathered` gets [name, full bytes] of every tensor the library asks an engine to gather;
    `gather_bytes` gets, per gather, the bytes the engine's real primitive materialised inside
    it: DeepSpeed's `GatheredParameters` for ZeRO-3, `DTensor.full_tensor` for FSDP2.
    """
    _count_materialised_bytes(deepspeed)
    for engine in _gather.ENGINES:
        engine.gathered = _recording(engine.gathered, model, gathered, gather_bytes)


def _recording(real, model: nn.Module, gathered: list, gather_bytes: list):
    @contextlib.contextmanager
    def recording(tensors, keep):
        names = {id(p): n for n, p in model.named_parameters()}  # now: FSDP2 replaced the Parameter objects
        gathered.extend([names.get(id(t), "?"), _gather.stored_nbytes(t)] for t in tensors.values())
        _open_gathers.append(0)
        try:
            with real(tensors, keep) as state:
                yield state
        finally:
            gather_bytes.append(_open_gathers.pop())

    return recording


def _materialised(nbytes: int) -> None:
    if _open_gathers:
        _open_gathers[-1] += nbytes


def _count_materialised_bytes(deepspeed_in_use: bool) -> None:
    real_full_tensor = DTensor.full_tensor

    def full_tensor(self, *args, **kwargs):
        full = real_full_tensor(self, *args, **kwargs)
        _materialised(full.numel() * full.element_size())
        return full

    DTensor.full_tensor = full_tensor
    if not deepspeed_in_use:
        return
    import deepspeed

    class CountingGatheredParameters(deepspeed.zero.GatheredParameters):
        def __enter__(self):
            entered = super().__enter__()
            _materialised(sum(p.numel() * p.element_size() for p in getattr(self, "params", [])))
            return entered

    deepspeed.zero.GatheredParameters = CountingGatheredParameters
