"""One checkpoint's copy to the upload target, manifest last.

`copy_checkpoint` runs one attempt of steps 1-3 in `_upload`'s docstring.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._manifest import MANIFEST_NAME
from ._readers import read_manifest
from ._remote import Remote


class Skip(Exception):
    """The local checkpoint is gone or was replaced: nothing of it is to be uploaded now."""


class Stopped(Exception):
    """The uploader was stopped while uploading."""


@dataclass
class Job:
    """One queued checkpoint."""

    name: str
    path: Path
    stop: threading.Event
    manifest_bytes: bytes = b""
    done: set[str] = field(default_factory=set)


def copy_checkpoint(remote: Remote, job: Job) -> int:
    """One attempt to copy `job`'s checkpoint, manifest last; the bytes sent. Raises Skip, Stopped or the store's error.

    Files uploaded and checked by an earlier attempt of the same job are not sent again.
    """
    manifest_bytes, manifest = read_local_manifest(job.path)
    if manifest_bytes != job.manifest_bytes:  # first attempt, or replaced since the last one
        job.manifest_bytes, job.done = manifest_bytes, set()
    remote.remove(f"{job.name}/{MANIFEST_NAME}")
    sent = _send_files(remote, job, manifest["files"])
    for extra in sorted(remote.files_of(job.name) - set(manifest["files"]) - {MANIFEST_NAME}):
        remote.remove(f"{job.name}/{extra}")
    if read_local_manifest(job.path)[0] != manifest_bytes:
        raise Skip  # replaced while uploading: its own save queued the replacement
    entry = {"bytes": len(manifest_bytes), "sha256": hashlib.sha256(manifest_bytes).hexdigest()}
    remote.put_bytes(f"{job.name}/{MANIFEST_NAME}", manifest_bytes, entry)
    return sent + len(manifest_bytes)


def _send_files(remote: Remote, job: Job, files: dict[str, Any]) -> int:
    """Upload and check the files this job has not done yet; the bytes sent."""
    sent = 0
    for relative, entry in sorted(files.items()):
        if relative not in job.done:
            if job.stop.is_set():
                raise Stopped
            remote.put_file(job.path / relative, f"{job.name}/{relative}", entry)
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
