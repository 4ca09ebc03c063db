"""The upload-target seam: what the uploader needs of a store, and which store serves a URL.

A target is `<root>/<checkpoint name>/<files>` on one store. The uploader writes each file and reads
back what the store kept (`put_file`, `put_bytes`: both check it against the manifest entry), lists and
deletes (`checkpoint_names`, `files_of`, `remove`, `remove_checkpoint`), and probes at start-up
(`check_writable`). A store with transactions may also offer `commit(name)`, called after a checkpoint's
manifest is up. A new store is one module whose class `accepts(url)`, plus one line in `TARGETS`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .fsspec_target import FsspecTarget


class UploadTarget(Protocol):
    url: str  # as the user gave it, for messages
    endpoint: str  # where requests go, for messages

    def local_root(self) -> Path | None:
        """The target directory when the store is this machine's filesystem, else None."""

    def check_writable(self, timeout_s: float) -> None:
        """Write and delete a probe within `timeout_s`; raise a CheckpointError naming the fix."""

    def put_file(self, local: Path, relative: str, entry: dict[str, Any],
                 progress: Callable[[], None] | None = None) -> None:
        """Write one file and check what the store kept against its manifest `entry` (bytes, digest)."""

    def put_bytes(self, relative: str, data: bytes, entry: dict[str, Any]) -> None:
        """Write `data` and check it against `entry`."""

    def checkpoint_names(self) -> set[str]:
        """Names of the checkpoint directories under the root, complete or not."""

    def files_of(self, name: str) -> set[str]:
        """Every object under `<root>/<name>/`, as paths relative to it."""

    def remove(self, relative: str) -> None:
        """Delete one object; deleting one that is not there is not an error."""

    def remove_checkpoint(self, name: str) -> None:
        """Delete `<root>/<name>/`, its manifest first."""


TARGETS: tuple[Any, ...] = (FsspecTarget,)  # the first whose `accepts(url)` is true serves it


def make(url: Any, storage_options: dict[str, Any] | None) -> UploadTarget:
    """The target for `url`; checks it and builds its client, connecting to nothing. Raises TypeError/ValueError/
    ImportError naming the fix."""
    if not isinstance(url, (str, os.PathLike)):
        raise TypeError(f"Upload(to={url!r}) must be a URL string such as 's3://bucket/prefix', or a local path")
    if storage_options is not None and not isinstance(storage_options, dict):
        raise TypeError(f"Upload(storage_options={storage_options!r}) must be a dict of the store's options, or None")
    for target in TARGETS:
        if target.accepts(os.fspath(url)):
            return target(os.fspath(url), storage_options)
    raise ValueError(f"Upload(to={url!r}): no upload target accepts this URL")


def check(url: Any, storage_options: dict[str, Any] | None) -> None:
    make(url, storage_options)
