"""What follows a publish, beside training: the upload, then the `on_published` hook; and the stall reports of
every piece of background work (the async save, the upload, the hook).

Who does what (decided at `open`): rank 0 uploads and runs hooks, also with `save_on_each_node=True` (every
node's local rank 0 then publishes its own copy, but one copy goes to the store and one evaluation runs per
checkpoint); with `Upload(to=".../{node}")` every publisher uploads its copy to its node's prefix. Every rank
watches its own background work for stalls. Nothing here raises into training after `open`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from . import options
from ._dist import raise_on_all_ranks
from ._format.readers import read_manifest
from ._hooks.command import Published
from ._hooks.runner import HookRunner
from ._measure.stalls import Task
from ._upload.uploader import Uploader
from ._write.nodes import publisher_index
from ._write.roles import Team
from ._write.saver import Saved, Saver

logger = logging.getLogger(__name__)


class AfterPublish:
    def __init__(self, upload: options.Upload | None, hook: options.Hook | None, stalls: options.Stalls) -> None:
        self.upload = upload
        self.uploader: Uploader | None = None  # made at `open`, on the rank(s) that upload
        self.hooks: HookRunner | None = hook.runner() if hook is not None else None
        self.stalls = stalls.watch()
        self._saver: Saver | None = None
        self._hooked = False  # this rank runs the hooks
        self._waiting_for_upload: dict[str, Published] = {}  # published, queued for upload, hook not yet queued

    def open(self, team: Team, output_dir: Path, keep_last: int | None, saver: Saver) -> None:
        """Collective: the upload target's start-up probe where this rank uploads (a failure is raised on every
        rank), then the hook queue (rank 0) and the stall watch (every rank)."""
        node = publisher_index(team) if self.upload is not None and self.upload.per_node else None
        uploads = self.upload is not None and (team.rank == 0 if not self.upload.per_node else node is not None)
        error, self.uploader = None, None
        if uploads:
            try:
                assert self.upload is not None
                self.uploader = self.upload.uploader(node)
                self.uploader.open(output_dir, keep_last)
                self.uploader.on_uploaded = self._uploaded
            except Exception as exc:
                error = exc
        raise_on_all_ranks(error)
        self._saver, self._waiting_for_upload = saver, {}
        self._hooked = self.hooks is not None and team.rank == 0
        if self.hooks is not None and self._hooked:
            self.hooks.open()
        self.stalls.start([self._save_task, self._upload_task, self._hook_task])

    def published(self, saved: Saved | None) -> None:
        """Local: a checkpoint was just published on this rank: queue its upload, or (without one) its hook."""
        if saved is None or saved.path is None:
            return
        uploader = self.uploader
        if uploader is not None and uploader.is_open:
            if self._hooked:
                url = f"{uploader.remote.url.rstrip('/')}/{saved.name}"
                self._waiting_for_upload[saved.name] = Published(saved.name, saved.step, saved.path, url)
            uploader.enqueue(saved.path)
        elif self._hooked and self.hooks is not None:
            self.hooks.enqueue(Published(saved.name, saved.step, saved.path, str(saved.path)))

    def waiting(self, who: str) -> None:
        """Local, before training blocks on the background save: say what it waits for (never raises)."""
        try:
            self.stalls.waiting(who, self._save_task())
        except Exception as exc:  # a report must not stop training
            logger.debug("could not say what %s waits for: %s", who, exc)

    def finish(self, stop_when: Any) -> None:
        """Train end, local: wait (bounded) for the uploads, then for the hooks; say what is waited for and what is
        abandoned. Never raises."""
        uploader = self.uploader
        if uploader is not None and uploader.is_open:
            left = uploader.waiting_for()
            if left is not None:
                logger.info("Train end waits for uploads to %s: %s", uploader.remote.url, left)
            uploader.finish(stop_when=stop_when)
        unhooked = [name for name, c in self._waiting_for_upload.items() if read_manifest(c.path) is not None]
        if unhooked:  # (the others were pruned locally before their upload: nothing to evaluate)
            logger.warning("The on_published hook did not run for %s: not uploaded", ", ".join(unhooked))
        if self.hooks is not None and self._hooked:
            left = self.hooks.unfinished()
            if left is not None:
                logger.info("Train end waits for the on_published hook `%s`: %s", self.hooks.name, left)
            self.hooks.finish(stop_when)
        self.stalls.stop()

    def release(self) -> None:
        if self.uploader is not None:
            self.uploader.stop()
        if self.hooks is not None:
            self.hooks.stop()
        self.stalls.stop()

    # -- in the upload worker's thread, and the stall watch's ------------------------------------------

    def _uploaded(self, name: str) -> None:
        published = self._waiting_for_upload.pop(name, None)
        if published is not None and self.hooks is not None:
            self.hooks.enqueue(published)

    def _save_task(self) -> Task | None:
        activity = self._saver.activity if self._saver is not None else None
        if activity is None:
            return None
        name, doing, since = activity
        return Task("save", f"save:{name}:{since}", f"the background save of {name}", doing, since)

    def _upload_task(self) -> Task | None:
        uploader = self.uploader
        current = uploader.current if uploader is not None else None
        if uploader is None or current is None:
            return None
        name, since = current
        activity = uploader.activity
        doing = "between two operations" if activity is None else (
            f"{activity.what} at {uploader.remote.endpoint}, which has not answered for {activity.silent_s():.0f} s")
        return Task("upload", f"upload:{name}:{since}", f"the upload of {name} to {uploader.remote.url}", doing, since)

    def _hook_task(self) -> Task | None:
        running = self.hooks.running if self.hooks is not None else None
        if running is None:
            return None
        name = running.checkpoint.name
        return Task("hook", f"hook:{name}:{running.started}", f"the on_published hook for {name}",
                    f"running {running.describe()}", running.started)
