"""Background uploads of published checkpoints to an fsspec target, manifest last.

The writer hands each published checkpoint to an `Uploader`, whose one worker thread (the only
thread it adds) copies it to `<Upload.to>/<name>/`:
 1. the remote `checkpoint.json` is deleted first, so a replaced checkpoint never looks complete
    while its files are being overwritten;
 2. every file the local manifest lists is uploaded and checked (see `targets.py`); objects the
    manifest does not list are deleted;
 3. the manifest is uploaded last: a remote reader that finds it finds every file.
Each checkpoint is re-read through its manifest before and after, so one pruned or replaced
locally in the meantime is skipped (a replacement is queued by its own save). Failed attempts are
retried with bounded exponential backoff, then reported; a failed checkpoint is tried again with
the next one. After each upload, remote checkpoints that no longer exist locally are deleted
(only when `keep_last` prunes locally). Nothing here raises into training or touches local files.

Nothing here waits on the store without a bound: `open` gives the start-up probe `timeout_s`;
`finish` (train end) stops waiting when the worker's remote operation has shown no progress for
`timeout_s`, when `stop_when()` turns True (a preemption signal), or after `wait_s`; `stop` never
joins a worker that is inside a remote operation. The worker records that operation (`activity`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._format.readers import complete_checkpoints, read_manifest
from .job import Activity, Job, Skip, Stopped, copy_checkpoint
from .targets import UploadTarget

logger = logging.getLogger(__name__)

_JOIN_S = 10.0  # stop() joins an idle worker (it returns at once); a busy one is not waited for
_POLL_S = 0.2  # train end's wait looks at stop_when, the worker and the clock this often


@dataclass(frozen=True)
class Retry:
    """`tries` attempts per checkpoint; waits `first_delay_s`, doubling, at most `max_delay_s` between them."""

    tries: int = 5
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def __post_init__(self) -> None:
        if isinstance(self.tries, bool) or not isinstance(self.tries, int) or self.tries < 1:
            raise ValueError(f"Retry(tries={self.tries!r}) must be an int of at least 1")
        for name in ("first_delay_s", "max_delay_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Retry({name}={value!r}) must be a number of seconds >= 0")

    def delay(self, failed_attempts: int) -> float:
        return min(self.first_delay_s * 2 ** (failed_attempts - 1), self.max_delay_s)


class Uploader:
    """Uploads checkpoints in the background. Writer-only (rank 0); every method but `open` never raises."""

    def __init__(self, target: UploadTarget, wait_s: float | None, timeout_s: float, retry: Retry) -> None:
        """Connects to nothing (the target was checked when the options were built)."""
        self.remote = target
        self.wait_s, self.timeout_s, self.retry = wait_s, timeout_s, retry
        self._cond = threading.Condition()
        self._pending: OrderedDict[str, Path] = OrderedDict()
        self._failed: dict[str, tuple[Path, str]] = {}
        self._busy = False  # the worker has a checkpoint (uploading it, pruning after it, or waiting to retry)
        self._current: str | None = None  # the checkpoint it is uploading
        self._since = 0.0  # time.monotonic() when the worker took its checkpoint (stall reports)
        self.on_uploaded: Callable[[str], None] | None = None  # called by the worker with each uploaded name
        self._activity: Activity | None = None  # its remote operation in flight
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._output_dir: Path | None = None
        self._keep_last: int | None = None

    @property
    def is_open(self) -> bool:
        return self._output_dir is not None

    @property
    def activity(self) -> Activity | None:
        """The worker's remote operation in flight, or None: what a stalled upload waits for, and how long."""
        return self._activity

    @property
    def current(self) -> tuple[str, float] | None:
        """The checkpoint the worker is uploading, and time.monotonic() when it took it; None when idle."""
        with self._cond:
            return (self._current, self._since) if self._current is not None else None

    def waiting_for(self) -> str | None:
        """What train end would wait for (the checkpoint in progress, with its operation, then the queue)."""
        with self._cond:
            return self._unfinished() if self._pending or self._busy else None

    def open(self, output_dir: Path, keep_last: int | None) -> None:
        """on_train_begin, writer: check the target is writable (raises CheckpointError naming the fix)."""
        self.stop()
        local = self.remote.local_root()
        if local is not None and _within(local, output_dir):
            raise ValueError(
                f"Upload(to={self.remote.url!r}) is output_dir {output_dir} or inside it; choose a directory outside it"
            )
        self.remote.check_writable(self.timeout_s)
        self._output_dir, self._keep_last = output_dir, keep_last
        self._stop = threading.Event()
        self._failed.clear()

    def enqueue(self, path: Path) -> None:
        """Queue a published checkpoint (and again any that failed before); returns at once."""
        with self._cond:
            for name, (failed_path, _) in self._failed.items():
                self._pending.setdefault(name, failed_path)
            self._pending.pop(path.name, None)
            self._pending[path.name] = path
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="open_instruct_ckpt-upload", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def finish(self, stop_when: Callable[[], bool] = lambda: False) -> None:
        """Train end: wait for the queue to drain; then report what is not uploaded.

        The wait ends early: at once when `stop_when()` (polled a few times a second) turns True, when the
        worker's remote operation has shown no progress for `timeout_s`, and after `wait_s` at most.
        """
        if not self.is_open:
            return
        why = self._wait(stop_when)
        with self._cond:
            unfinished, failed = self._unfinished(), dict(self._failed)
        if why is not None:
            logger.warning("%s; not uploaded: %s. The local checkpoints are complete: copy them by hand, "
                           "checkpoint.json last", why, unfinished)
        if failed:
            logger.warning(
                "Not uploaded to %s: %s. The local checkpoints are complete and untouched; copy them by hand, "
                "checkpoint.json last", self.remote.url,
                "; ".join(f"{name} ({reason})" for name, (_, reason) in failed.items()),
            )
        elif why is None:
            logger.info("Every checkpoint is uploaded to %s", self.remote.url)

    def _wait(self, stop_when: Callable[[], bool]) -> str | None:
        """None once the queue is drained; else why train end stops waiting."""
        deadline = None if self.wait_s is None else time.monotonic() + self.wait_s
        with self._cond:
            while self._pending or self._busy:
                if stop_when():
                    return f"A preemption signal ended train end's wait for uploads to {self.remote.url}"
                stuck = self._activity
                if stuck is not None and stuck.silent_s() >= self.timeout_s:
                    return (f"Uploads to {self.remote.url} stopped waiting: {self.remote.endpoint} has not answered "
                            f"for {stuck.silent_s():.0f} s (Upload(timeout_s={self.timeout_s})) while {stuck.what}")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return f"Uploads to {self.remote.url} did not finish within Upload(wait_s={self.wait_s}) s"
                self._cond.wait(_POLL_S if left is None else min(_POLL_S, left))
        return None

    def _unfinished(self) -> str:
        """Under the lock: what is not uploaded, the checkpoint in progress (and its operation, if any) first."""
        names = []
        if self._current is not None:
            activity = self._activity
            doing = f": {activity.describe()}" if activity is not None and activity.checkpoint == self._current else ""
            names.append(f"{self._current} (in progress{doing})")
        names += [f"{name} (queued)" for name in self._pending]
        return ", ".join(names) or "nothing"

    def stop(self) -> None:
        """Stop the worker between two remote operations (an unfinished upload has no remote manifest).

        A worker inside a remote operation is not waited for: it may hang, and it cannot be interrupted. It
        stops after that operation, touching nothing of this uploader's state (see `_update`).
        """
        self._stop.set()
        with self._cond:
            busy = self._busy
            self._pending.clear()
            self._busy, self._current, self._activity = False, None, None
            self._cond.notify_all()
        if not busy and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(_JOIN_S)
        self._thread, self._output_dir = None, None

    # -- the worker --------------------------------------------------------------------------------

    def _work(self) -> None:
        stop = self._stop
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or stop.is_set())
                if stop.is_set():
                    return
                name, path = self._pending.popitem(last=False)
                self._busy, self._current, self._since = True, name, time.monotonic()
            try:
                self._upload_with_retries(Job(name, path, stop, lambda doing: self._update(stop, _activity=doing)))
            except BaseException as exc:  # never let the worker die silently
                self._fail(name, path, exc)
            finally:
                self._update(stop, _busy=False, _current=None, _activity=None)

    def _update(self, stop: threading.Event, **fields: Any) -> None:
        """Set the worker's state fields, unless `stop()` abandoned this worker (a new one may be running)."""
        with self._cond:
            if not stop.is_set():
                for name, value in fields.items():
                    setattr(self, name, value)
            self._cond.notify_all()

    def _upload_with_retries(self, job: Job) -> None:
        for attempt in range(1, self.retry.tries + 1):
            try:
                self._attempt(job)
                return
            except Stopped:
                return
            except Exception as exc:
                if isinstance(exc, Skip) or read_manifest(job.path) is None:
                    logger.debug("Not uploading %s: pruned or replaced locally meanwhile", job.path)
                    with self._cond:
                        self._failed.pop(job.name, None)  # a replacement is queued by its own save
                    return
                if attempt == self.retry.tries:
                    self._fail(job.name, job.path, exc)
                    return
                delay = self.retry.delay(attempt)
                logger.info("Upload of %s: attempt %d of %d failed (%s: %s); retrying in %.1f s",
                            job.path, attempt, self.retry.tries, type(exc).__name__, exc, delay)
                if job.stop.wait(delay):
                    return

    def _attempt(self, job: Job) -> None:
        started = time.perf_counter()
        sent = copy_checkpoint(self.remote, job)
        logger.info("Uploaded %s to %s: %d bytes in %.2f s", job.path, self.remote.url, sent,
                    time.perf_counter() - started)
        with self._cond:
            self._failed.pop(job.name, None)
        self._update(job.stop, _current=None)
        self._tell_uploaded(job)
        self._prune_remote(job)

    def _tell_uploaded(self, job: Job) -> None:
        """`on_uploaded(name)` (the hooks' queue); a failure there is logged, never raised."""
        if self.on_uploaded is None or job.stop.is_set():
            return
        try:
            self.on_uploaded(job.name)
        except Exception as exc:
            logger.warning("After uploading %s: on_uploaded failed (%s: %s)", job.name, type(exc).__name__, exc)

    def _fail(self, name: str, path: Path, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        with self._cond:
            self._failed[name] = (path, reason)
        logger.warning(
            "Uploading %s to %s failed after %d attempts (%s). Training goes on and the local checkpoint is "
            "untouched; the upload is tried again after the next save and reported at train end",
            path, self.remote.url, self.retry.tries, reason,
        )

    def _prune_remote(self, job: Job) -> None:
        """Delete remote checkpoints that `keep_last` pruned locally; best-effort, retried after each upload."""
        output_dir = self._output_dir
        if self._keep_last is None or output_dir is None:
            return
        local = {manifest.get("name") for _, manifest in complete_checkpoints(output_dir)}
        try:
            with self._cond:
                queued = set(self._pending)
            with job.doing("listing the checkpoints under the prefix"):
                names = self.remote.checkpoint_names()
            for name in sorted(names - local - queued):
                if job.stop.is_set():
                    return
                with job.doing(f"deleting {name}/ (keep_last)", checkpoint=name):
                    self.remote.remove_checkpoint(name)
                logger.info("Removed %s from %s: it no longer exists locally (keep_last)", name, self.remote.url)
        except Exception as exc:
            logger.warning("Pruning old checkpoints under %s failed (%s: %s); retried after the next upload",
                           self.remote.url, type(exc).__name__, exc)


def _within(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents
