"""One checkpoint's copy to the upload target, manifest last, and a record of what it is doing.

`copy_checkpoint` runs one attempt of steps 1-3 in `_upload`'s docstring. Every remote operation of
a job runs inside `job.doing(...)`, which hands the uploader an `Activity` (which checkpoint, what
operation on which object, since when, when the store last showed progress) for as long as it
runs: train end bounds the wait by it and names it when it gives up.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._format.manifest import MANIFEST_NAME
from .._format.readers import read_manifest
from .targets import UploadTarget


@dataclass
class Activity:
    """A remote operation in flight: for which checkpoint, what (naming the object), since when."""

    checkpoint: str
    what: str  # "uploading step_4/model.safetensors (1234 bytes)"
    started: float = field(default_factory=time.monotonic)
    answered: float = 0.0  # time.monotonic() of the store's last sign of progress

    def __post_init__(self) -> None:
        self.answered = self.answered or self.started

    def progressed(self) -> None:
        self.answered = time.monotonic()

    def silent_s(self) -> float:
        return time.monotonic() - self.answered

    def describe(self) -> str:
        return f"{self.what}, {time.monotonic() - self.started:.1f} s so far"


class Skip(Exception):
    """The local checkpoint is gone or was replaced: nothing of it is to be uploaded now."""


class Stopped(Exception):
    """The uploader was stopped while uploading."""


@dataclass
class Job:
    """One queued checkpoint; `record` tells the uploader which remote operation is in flight (None: none)."""

    name: str
    path: Path
    stop: threading.Event
    record: Callable[[Activity | None], None]
    manifest_bytes: bytes = b""
    done: set[str] = field(default_factory=set)

    @contextmanager
    def doing(self, what: str, checkpoint: str | None = None) -> Iterator[Activity]:
        activity = Activity(checkpoint or self.name, what)
        self.record(activity)
        try:
            yield activity
        finally:
            self.record(None)


def copy_checkpoint(remote: UploadTarget, job: Job) -> int:
    """One attempt to copy `job`'s checkpoint, manifest last; the bytes sent. Raises Skip, Stopped or the store's error.

    Files uploaded and checked by an earlier attempt of the same job are not sent again.
    """
    manifest_bytes, manifest = read_local_manifest(job.path)
    if manifest_bytes != job.manifest_bytes:  # first attempt, or replaced since the last one
        job.manifest_bytes, job.done = manifest_bytes, set()
    with job.doing(f"deleting {job.name}/{MANIFEST_NAME}"):
        remote.remove(f"{job.name}/{MANIFEST_NAME}")
    sent = _send_files(remote, job, manifest["files"])
    with job.doing(f"listing {job.name}/"):
        extras = remote.files_of(job.name) - set(manifest["files"]) - {MANIFEST_NAME}
    for extra in sorted(extras):
        with job.doing(f"deleting {job.name}/{extra} (not in the manifest)"):
            remote.remove(f"{job.name}/{extra}")
    if read_local_manifest(job.path)[0] != manifest_bytes:
        raise Skip  # replaced while uploading: its own save queued the replacement
    if job.stop.is_set():
        raise Stopped  # abandoned: it gets no manifest
    entry = {"bytes": len(manifest_bytes), "sha256": hashlib.sha256(manifest_bytes).hexdigest()}
    with job.doing(f"uploading {job.name}/{MANIFEST_NAME}"):
        remote.put_bytes(f"{job.name}/{MANIFEST_NAME}", manifest_bytes, entry)
    return sent + len(manifest_bytes)


def _send_files(remote: UploadTarget, job: Job, files: dict[str, Any]) -> int:
    """Upload and check the files this job has not done yet; the bytes sent."""
    sent = 0
    for relative, entry in sorted(files.items()):
        if relative not in job.done:
            if job.stop.is_set():
                raise Stopped
            with job.doing(f"uploading {job.name}/{relative} ({entry['bytes']} bytes)") as activity:
                remote.put_file(job.path / relative, f"{job.name}/{relative}", entry, activity.progressed)
            job.done.add(relative)
            sent += entry["bytes"]
    return sent


def read_local_manifest(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The local manifest's bytes and content, if `path` is a complete checkpoint; raises Skip otherwise."""
    manifest = read_manifest(path)
    try:
        data = (path / MANIFEST_NAME).read_bytes()
        same = manifest is not None and json.loads(data) == manifest
    except (OSError, ValueError):
        same = False
    if not same or manifest is None:
        raise Skip
    return data, manifest
