"""Async saves: a host staging arena for the snapshot, and one background thread for the rest of the save.

Training waits only for the snapshot: the (collective) gather and a copy of every saved tensor
into the arena, which is allocated once and reused by later saves (pinned when CUDA is present, so
device-to-host copies are non-blocking). The persist phase (write + digest, fsync, seal, publish,
clean-up) is the sync code path run by `Background` in one worker thread; its result (the published
checkpoint or the exception) is taken later by the Saver's `poll` or `wait`.

A thread, not a process: the persist phase spends its time in write(2), fsync(2) and hashlib,
all of which release the GIL, so a thread competes with training for CPU and disk but hardly for
the GIL (benchmarks/save_speed.py row 3 measures it). A worker process would need the arena in
shared memory and the tokenizer pickled across, for no gain on that measurement. On Linux the
thread runs at a lower CPU priority (nice +10, inherited by the hashing threads it starts), so
where cores are short training keeps them and the save takes longer instead; when training waits
for the save (the next save, a preemption, train end) the save gets its full priority back (where the
process may raise it again: root or RLIMIT_NICE; elsewhere it is never lowered).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_ALIGN = 64  # every tensor starts 64-byte aligned, so a byte slice can be viewed as any dtype
BACKGROUND_NICENESS = 10  # measured on 2 cores: training 0.83x instead of 0.5x while saving, the save ~2x longer


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where it cannot be read (then nothing is refused)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class Arena:
    """Writer-only host memory that snapshot tensors are copied into; reused by every save of the run."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._offset = 0

    @property
    def capacity(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    @property
    def pinned(self) -> bool:
        return self._buffer is not None and self._buffer.is_pinned()

    def fits(self, nbytes: int) -> bool:
        """Whether a snapshot of `nbytes` fits in the arena, or in host memory when the arena must grow."""
        if nbytes <= self.capacity:
            return True
        available = available_host_bytes()
        return available is None or available + self.capacity > nbytes * 1.1 + (1 << 30)

    def reset(self, nbytes: int) -> None:
        """Start a snapshot of about `nbytes`: (re)allocate only when the arena is too small."""
        if nbytes > self.capacity:
            self._buffer = None  # give the old arena back before taking the bigger one
            pinned = torch.cuda.is_available()
            self._buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self._offset = 0

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A true copy of `tensor` in the arena (a fresh tensor if the arena is full): never a view of the model."""
        nbytes = tensor.numel() * tensor.element_size()
        start = -(-self._offset // _ALIGN) * _ALIGN
        if self._buffer is None or start + nbytes > self._buffer.numel():
            return tensor.detach().to("cpu", copy=True)
        self._offset = start + nbytes
        slot = self._buffer[start : start + nbytes].view(tensor.dtype).view(tensor.shape)
        slot.copy_(tensor.detach(), non_blocking=self._buffer.is_pinned())
        return slot

    def settle(self) -> None:
        """Wait for non-blocking device-to-host copies, before the snapshot counts as taken."""
        if self._buffer is not None and self._buffer.is_pinned():
            torch.cuda.synchronize()


class Background:
    """At most one piece of work in flight, in a worker thread at a lower CPU priority; its result is taken once."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._result: tuple[Any, BaseException | None] | None = None
        self._priority = threading.Lock()
        self._waited_on = False  # training waits for the work in flight: it runs at full priority from now on

    @property
    def pending(self) -> bool:
        """Work was started and its result not yet taken (done or not)."""
        return self._thread is not None

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, work: Callable[[], tuple[Any, BaseException | None]]) -> None:
        """Run `work` in the background; what it returns (or the exception it raises) is the next result."""
        if self._thread is not None:
            raise RuntimeError("a background save is still pending: take its result first")
        self._result, self._waited_on = None, False
        self._thread = threading.Thread(target=self._run, args=(work,), name="open_instruct_ckpt-save", daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], tuple[Any, BaseException | None]]) -> None:
        with self._priority:
            if not self._waited_on:
                _yield_cpu_to_training()
        try:
            self._result = work()
        except BaseException as exc:  # handed to the training thread by result()
            self._result = (None, exc)

    def result(self) -> tuple[Any, BaseException | None]:
        """Wait for the work in flight (at full priority: training waits for it) and take its result."""
        self.join()
        result, self._result, self._thread = self._result or (None, None), None, None
        return result

    def join(self) -> None:
        if self._thread is None:
            return
        with self._priority:
            self._waited_on = True
            if self._thread.is_alive():
                _restore_priority()
        self._thread.join()


def _yield_cpu_to_training() -> None:
    """Linux: lower the calling thread's CPU priority by BACKGROUND_NICENESS (nice is per thread there;
    elsewhere setpriority would take a thread id for a process id, so nothing is done), but only where it can be
    raised again when training waits for the save (root, or RLIMIT_NICE allows it)."""
    if not sys.platform.startswith("linux") or not _can_restore_priority():
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + BACKGROUND_NICENESS))
    except OSError as exc:  # e.g. a seccomp profile forbids it: the save still runs, at the same priority
        logger.debug("background save keeps its CPU priority: %s", exc)


@functools.lru_cache(maxsize=1)
def _can_restore_priority() -> bool:
    """Whether a thread of this process may lower its nice value again (a probe on a throwaway thread)."""
    result: list[bool] = []

    def probe() -> None:
        thread = threading.get_native_id()
        base = os.getpriority(os.PRIO_PROCESS, thread)
        try:
            os.setpriority(os.PRIO_PROCESS, thread, min(19, base + 1))
            os.setpriority(os.PRIO_PROCESS, thread, base)
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, name="open_instruct_ckpt-nice-probe", daemon=True)
    worker.start()
    worker.join()
    return bool(result and result[0])


def _restore_priority() -> None:
    """Give every thread of this process that a background save lowered (the saver and its hashers) the
    priority of the calling (training) thread again."""
    if not sys.platform.startswith("linux"):
        return
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    lowered = min(19, base + BACKGROUND_NICENESS)
    for _ in range(2):  # again: a hasher the saver started while the first pass ran
        for task in Path("/proc/self/task").iterdir():
            try:
                tid = int(task.name)
                if tid != threading.get_native_id() and os.getpriority(os.PRIO_PROCESS, tid) == lowered:
                    os.setpriority(os.PRIO_PROCESS, tid, base)
            except (OSError, ValueError):  # a thread that ended meanwhile
                continue
