"""The upload target: an fsspec filesystem and a prefix, and the few operations uploads need.

fsspec is imported only when an upload target is set; s3fs, for `s3://`, is the optional extra
`open_instruct_ckpt[s3]`. Every object is checked after it is written: its size (HEAD on S3,
`fs.info` elsewhere), and its sha256 where the store reports one. Objects under `SINGLE_PUT_BYTES`
are read whole, checked against the manifest's digest (blake3; sha256 in format /1), and, on S3,
sent in one PUT with `ChecksumAlgorithm="SHA256"`: S3 checks the body against that digest on
receipt, and the HEAD afterwards must return the SHA-256 of the bytes sent (computed here, in the
upload thread, off the training path).
Larger objects go through s3fs's multipart upload, where S3 checks each part's CRC on receipt
and only the size is compared afterwards. Other stores (a local directory, `file://`) report no
sha256: size only. Nothing is downloaded again.

Remote calls made on the training path are bounded: `check_writable` gives the store
`Upload(timeout_s=...)` to answer (see `bounded`), and uploads report progress, so that train end can
tell a hung store from a large file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._errors import CheckpointError
from .._format import digest
from .._format.manifest import MANIFEST_NAME, is_checkpoint_name

SINGLE_PUT_BYTES = 64 * 1024 * 1024
INSTALL_HINT = 'pip install "open_instruct_ckpt[s3]"'


class UploadMismatch(Exception):
    """An uploaded object differs from what the manifest says (retried like any transient error)."""


class NoAnswer(TimeoutError):
    """A remote call did not return within its bound."""


def _fsspec() -> Any:
    try:
        import fsspec
    except ImportError as exc:
        raise ImportError(f"Upload(to=...) needs fsspec, an optional extra: {INSTALL_HINT}") from exc
    return fsspec


class FsspecTarget:
    """`<root>/<checkpoint name>/<files>` on one fsspec filesystem (S3 through s3fs, a local directory, ...)."""

    @staticmethod
    def accepts(url: str) -> bool:
        return True  # fsspec knows local paths and every registered protocol; the rest fails in __init__

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        """Check the URL and build the filesystem; connects to nothing. Raises TypeError/ValueError/ImportError."""
        self.url = _checked_url(url)
        self.fs, root = _fsspec().core.url_to_fs(self.url, **(storage_options or {}))
        self.root = root.rstrip("/")
        if not self.root:
            raise ValueError(f"Upload(to={self.url!r}) names no bucket or directory; use s3://bucket/prefix or a path")
        self.is_s3 = hasattr(self.fs, "call_s3")

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    @property
    def endpoint(self) -> str:
        """Where requests go, for messages: on S3 the `endpoint_url` (from `client_kwargs`) when set, else the URL."""
        if self.is_s3:
            client_kwargs = getattr(self.fs, "client_kwargs", None) or {}
            endpoint = client_kwargs.get("endpoint_url") or getattr(self.fs, "endpoint_url", None)
            if endpoint:
                return str(endpoint)
        return self.url

    def local_root(self) -> Path | None:
        """The target directory when the store is this machine's filesystem, else None."""
        return Path(self.root) if "file" in _protocols(self.fs) else None

    # -- start-up ------------------------------------------------------------------------------

    def check_writable(self, timeout_s: float) -> None:
        """Write and delete one small probe object under the prefix, within `timeout_s`; a CheckpointError names the fix."""
        probe = self.path(f".open_instruct_ckpt-probe-{uuid.uuid4().hex[:12]}")
        try:
            bounded(lambda: self._probe(probe), timeout_s)
        except NoAnswer as exc:
            raise CheckpointError(
                f"Upload(to={self.url!r}): {self.endpoint} did not answer within Upload(timeout_s={timeout_s}) s "
                "(writing a probe object); check that the endpoint is up and reachable, or raise Upload(timeout_s=...). "
                "Nothing was trained yet"
            ) from exc
        except Exception as exc:
            raise CheckpointError(_unwritable(self.url, self.endpoint, exc)) from exc

    def _probe(self, probe: str) -> None:
        self._make_parent(probe)
        self.fs.pipe_file(probe, b"probe")
        self.fs.rm_file(probe)

    # -- writing -------------------------------------------------------------------------------

    def put_file(self, local: Path, relative: str, entry: dict[str, Any],
                 progress: Callable[[], None] | None = None) -> None:
        """Upload one file to `<root>/<relative>` and check it against its manifest `entry`.

        `progress()` is called whenever the store has taken more of the file, where the filesystem says so
        (s3fs: after each part of a multipart upload); a single PUT or a local copy says nothing until done.
        """
        target = self.path(relative)
        if self.is_s3 and entry["bytes"] < SINGLE_PUT_BYTES:
            self.put_bytes(relative, local.read_bytes(), entry)
            return
        self._make_parent(target)
        self.fs.put_file(str(local), target, callback=_callback(progress))
        self.verify(target, entry["bytes"], None)

    def put_bytes(self, relative: str, data: bytes, entry: dict[str, Any]) -> None:
        """Upload `data` after checking it is what the manifest `entry` describes; S3 checks its SHA-256 on receipt
        and the HEAD afterwards must report the SHA-256 of what was sent."""
        target = self.path(relative)
        _check_against(entry, data, relative)
        if self.is_s3:
            self._s3_put(target, data)
        else:
            self._make_parent(target)
            self.fs.pipe_file(target, data)
        self.verify(target, len(data), hashlib.sha256(data).hexdigest())

    def _s3_put(self, target: str, data: bytes) -> None:
        bucket, key, _ = self.fs.split_path(target)
        self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, ChecksumAlgorithm="SHA256")
        self.fs.invalidate_cache(target)

    def _make_parent(self, target: str) -> None:
        if not self.is_s3:  # object stores need no directories; s3fs would create a missing bucket
            self.fs.makedirs(self.fs._parent(target), exist_ok=True)

    def verify(self, target: str, size: int, sha256: str | None) -> None:
        """What the store kept: `size` bytes, and the SHA-256 of what was sent where the store reports one."""
        stored_size, stored_sha256 = self._stored(target)
        if stored_size != size:
            raise UploadMismatch(f"{target}: {stored_size} bytes stored, {size} were sent")
        if sha256 is not None and stored_sha256 is not None and stored_sha256 != sha256:
            raise UploadMismatch(f"{target}: the store's sha256 {stored_sha256} is not that of the bytes sent, {sha256}")

    def _stored(self, target: str) -> tuple[int, str | None]:
        """The stored object's size, and its full-object sha256 (hex) where the store reports one."""
        self.fs.invalidate_cache(target)
        if not self.is_s3:
            return self.fs.info(target)["size"], None
        bucket, key, _ = self.fs.split_path(target)
        head = self.fs.call_s3("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        checksum = head.get("ChecksumSHA256")
        if not checksum or "-" in checksum:  # absent, or a multipart checksum of part checksums
            return head["ContentLength"], None
        try:
            return head["ContentLength"], base64.b64decode(checksum, validate=True).hex()
        except (binascii.Error, ValueError):
            return head["ContentLength"], None

    # -- reading and deleting --------------------------------------------------------------------

    def checkpoint_names(self) -> set[str]:
        """Names of the checkpoint directories under the prefix, complete or not."""
        self.fs.invalidate_cache(self.root)
        try:
            listed = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return set()
        names = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in listed}
        return {name for name in names if is_checkpoint_name(name)}

    def files_of(self, name: str) -> set[str]:
        """Every object under `<root>/<name>/`, as paths relative to it."""
        directory = self.path(name)
        self.fs.invalidate_cache(directory)
        try:
            found = self.fs.find(directory)
        except FileNotFoundError:
            return set()
        return {path[len(directory) + 1:] for path in found if path.startswith(directory + "/")}

    def remove(self, relative: str) -> None:
        """Delete one object; deleting one that is not there is not an error."""
        try:
            self.fs.rm_file(self.path(relative))
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self.path(relative))

    def remove_checkpoint(self, name: str) -> None:
        """Delete `<root>/<name>/`: its manifest first, so no reader ever sees it complete but partial."""
        self.remove(f"{name}/{MANIFEST_NAME}")
        for relative in sorted(self.files_of(name)):
            self.remove(f"{name}/{relative}")
        if not self.is_s3:
            try:
                self.fs.rm(self.path(name), recursive=True)
            except FileNotFoundError:
                pass


def bounded(call: Callable[[], Any], timeout_s: float) -> Any:
    """`call()`'s result, or its exception, if it returns within `timeout_s`; NoAnswer otherwise.

    The call runs in a daemon thread. One that hangs (a store that accepts connections and never
    answers) cannot be cancelled: it is left to end on its own, and nothing ever joins its thread.
    """
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the caller
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="open_instruct_ckpt-remote-call", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise NoAnswer(f"no answer within {timeout_s} s")
    returned, value = outcome[0]
    if not returned:
        raise value
    return value


def _callback(progress: Callable[[], None] | None) -> Any:
    """An fsspec callback that calls `progress()` on every update (fsspec passes it size and value)."""
    hooks = {} if progress is None else {"progress": lambda *_, **__: progress()}
    return _fsspec().callbacks.Callback(hooks=hooks)


def _check_against(entry: dict[str, Any], data: bytes, relative: str) -> None:
    """The bytes read for an upload are those the manifest describes (size and digest), or the file changed."""
    recorded = digest.recorded(entry)
    if len(data) != entry["bytes"] or recorded is None:
        raise UploadMismatch(f"{relative}: {len(data)} bytes read, the manifest says {entry['bytes']}")
    hasher = digest.new(recorded[0])
    hasher.update(data)
    if hasher.hexdigest() != recorded[1]:
        raise UploadMismatch(f"{relative}: its {recorded[0]} differs from the manifest's: the local file changed")


def _protocols(fs: Any) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _checked_url(url: Any) -> str:
    if not isinstance(url, (str, os.PathLike)):
        raise TypeError(f"Upload(to={url!r}) must be a URL string such as 's3://bucket/prefix', or a local path")
    url = os.fspath(url)
    fsspec = _fsspec()
    protocol, _ = fsspec.core.split_protocol(url)
    if protocol is None:
        return url
    if protocol not in fsspec.available_protocols():
        raise ValueError(
            f"Upload(to={url!r}): fsspec knows no protocol {protocol!r}; use s3://bucket/prefix, another fsspec "
            "URL (gs://, az://, file://) or a local path"
        )
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        hint = INSTALL_HINT if protocol in ("s3", "s3a") else "install the package fsspec names"
        raise ImportError(f"Upload(to={url!r}) needs the {protocol}:// filesystem: {exc}; {hint}") from exc
    return url


def _unwritable(url: str, endpoint: str, exc: BaseException) -> str:
    reason = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, FileNotFoundError):
        fix = "the bucket (or directory) does not exist: create it first, or fix the URL"
    elif isinstance(exc, PermissionError):
        fix = "access was denied: check the credentials (Upload(storage_options=...) or the environment) and their rights"
    else:
        fix = (f"check the endpoint ({endpoint}), the network and the credentials (Upload(storage_options=...) or the "
               "environment)")
    return f"Upload(to={url!r}) is not writable ({reason}); {fix}. Nothing was trained yet"
