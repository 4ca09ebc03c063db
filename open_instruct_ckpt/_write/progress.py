"""Progress bars for long checkpoint work on the writer (saves; uploads can use the same).

A bar appears only once the work has taken about a second (tqdm's `delay`), so short saves
print nothing, and never when the Trainer's `disable_tqdm` is set. The writing code reports
bytes with `advance(n)`; it does not know whether a bar is shown.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

DELAY_SECONDS = 1.0

_current: ContextVar[Any] = ContextVar("open_instruct_ckpt_progress", default=None)


@contextmanager
def bar(enabled: bool, total: int | None, description: str) -> Iterator[None]:
    """Show a byte-count bar for the work inside the block, in this thread, when `enabled`."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm  # lazily: the command line must start without it

    progress = tqdm(
        total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024, delay=DELAY_SECONDS,
        leave=False, dynamic_ncols=True,
    )
    token = _current.set(progress)
    try:
        yield
    finally:
        _current.reset(token)
        progress.close()


def advance(nbytes: int) -> None:
    """Report `nbytes` more written or uploaded; a no-op when no bar is active in this thread."""
    progress = _current.get()
    if progress is not None:
        progress.update(nbytes)
