"""The last phases of a save on the publisher: seal (manifest last), publish (the commit point), clean up.

After the rename into place nothing may stop training: clean-up (the replaced copy, retention, leftovers
of earlier clean-ups) only warns, once per leftover, and is retried at every save.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .._errors import CheckpointError
from .._format.manifest import FINAL_NAME, describe_files, manifest_fields
from .._format.readers import read_manifest
from .._measure.stats import PhaseTimer, SaveStats
from . import files
from .executor import WriteReport
from .settings import SaveSettings

logger = logging.getLogger(__name__)


class Leftovers:
    """What clean-up could not remove, each reported once per run (it is retried at every save)."""

    def __init__(self) -> None:
        self._reported: set[str] = set()

    def report(self, left: dict[Path, str]) -> None:
        new = {path: why for path, why in left.items() if str(path) not in self._reported}
        self._reported.update(str(path) for path in new)
        if new:
            logger.warning(
                "Checkpoints are safe, but clean-up left behind: %s. Another process may hold these files open "
                "(an evaluation job on NFS) or they sit on a mount point; they are retried at every save, or remove "
                "them by hand (rm -rf PATH) once nothing uses them", "; ".join(f"{p} ({why})" for p, why in new.items()),
            )


def seal_and_publish(settings: SaveSettings, staging: Path, report: WriteReport, name: str, step: int,
                     strategy: str, timer: PhaseTimer) -> tuple[files.Published, SaveStats]:
    """Publisher: the manifest (with the statistics so far) last, then the rename into place."""
    described = describe_files(staging, report.digests)
    timer.lap("write")
    stats = SaveStats(name, step, sum(e["bytes"] for e in described.values()), report.peak_held_bytes,
                      dict(timer.seconds))
    fields = manifest_fields(name, step, strategy, settings.run.id, settings.run.started_unix)
    files.seal(staging, {**fields, "stats": stats.in_manifest()}, files=described)
    timer.lap("seal")
    return files.publish(staging, settings.output_dir, name), stats


def clean_up(settings: SaveSettings, published: files.Published, leftovers: Leftovers) -> None:
    """Publisher, after the commit point: never raises; reports what it left behind, once per leftover.

    Pruning only moves checkpoints to the trash; the sweep then deletes the trash, the old copy
    this save replaced, and whatever earlier clean-ups could not remove.
    """
    try:
        left = files.prune(settings.output_dir, settings.keep_last, just_saved=published.path)
        left.update(files.sweep(settings.output_dir))
    except Exception as exc:  # the checkpoint is published: a clean-up bug must not end training
        left = {settings.output_dir: f"clean-up failed: {type(exc).__name__}: {exc}"}
    leftovers.report(left)


def link(settings: SaveSettings, source: Path, name: str = FINAL_NAME) -> files.Published:
    """Publisher: publish `name` as hard links to the complete checkpoint `source` (no second gather or write)."""
    staging = None
    try:
        source_manifest = read_manifest(source)
        if source_manifest is None:
            raise CheckpointError(f"cannot link {name}/ to {source}: it is not a complete checkpoint")
        staging = files.create_staging(settings.output_dir, name)
        files.hard_link_copy(source, staging)
        manifest = {**source_manifest, "name": name, "linked_from": source.name}
        manifest.pop("files")
        files.seal(staging, manifest, files=source_manifest["files"])
        return files.publish(staging, settings.output_dir, name)
    except BaseException:
        files.discard(staging)
        raise
