"""What a run holds between `on_train_begin` and `on_train_end`, given back however the run ends."""

from __future__ import annotations

from ._after import AfterPublish
from ._when.preemption import PreemptionWatch
from ._write.lock import RunLock
from ._write.saver import Saver


class Held:
    """What a run holds between `on_train_begin` and `on_train_end`: signal handlers, the lock, the background work
    after each publish (upload and hook workers, the stall watch), the saver and its background save.

    `TrainerCallback` has no hook for a `train()` that raises, so these are also given back when the next run
    starts, when the callback is garbage-collected, and by `CheckpointCallback.close()`.
    """

    def __init__(self, watch: PreemptionWatch, after: AfterPublish) -> None:
        self.watch, self.after = watch, after
        self.lock: RunLock | None = None
        self.saver: Saver | None = None

    def release(self) -> None:
        if self.saver is not None:
            self.saver.close()  # a background save publishes under the run lock, never after its release
        self.watch.uninstall()
        self.after.release()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
