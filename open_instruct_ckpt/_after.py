"""What follows a publish, beside training: the upload of each published checkpoint.

Who uploads (decided at `open`): rank 0, also with `save_on_each_node=True` (every node's local rank 0 then
publishes its own copy, but one copy goes to the store); with `Upload(to=".../{node}")` every publisher uploads
its copy to its node's prefix. Nothing here raises into training after `open`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from . import options
from ._dist import raise_on_all_ranks
from ._upload.uploader import Uploader
from ._write.nodes import publisher_index
from ._write.roles import Team
from ._write.saver import Saved, Saver

logger = logging.getLogger(__name__)


class AfterPublish:
    def __init__(self, upload: options.Upload | None) -> None:
        self.upload = upload
        self.uploader: Uploader | None = None if upload is None else upload.uploader()

    def open(self, team: Team, output_dir: Path, keep_last: int | None, saver: Saver) -> None:
        """Collective: the upload target's start-up probe where this rank uploads; a failure is raised on every rank."""
        node = publisher_index(team) if self.upload is not None and self.upload.per_node else None
        uploads = self.upload is not None and (team.rank == 0 if not self.upload.per_node else node is not None)
        error = None
        if uploads:
            try:
                assert self.upload is not None
                self.uploader = self.upload.uploader(node)
                self.uploader.open(output_dir, keep_last)
            except Exception as exc:
                error = exc
        raise_on_all_ranks(error)

    def published(self, saved: Saved | None) -> None:
        """Local: a checkpoint was just published on this rank: queue its upload where this rank uploads."""
        uploader = self.uploader
        if saved is not None and saved.path is not None and uploader is not None and uploader.is_open:
            uploader.enqueue(saved.path)

    def finish(self, stop_when: Any) -> None:
        """Train end, local: wait (bounded) for the uploads; never raises."""
        if self.uploader is not None:
            self.uploader.finish(stop_when=stop_when)

    def release(self) -> None:
        if self.uploader is not None:
            self.uploader.stop()
