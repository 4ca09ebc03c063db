"""Our log lines follow the Trainer's log level, and show where the Trainer's own messages show."""

from __future__ import annotations

import logging
import sys
from typing import Any

PACKAGE_LOGGER = logging.getLogger("open_instruct_ckpt")


def follow_trainer(args: Any) -> None:
    """Apply the Trainer's `log_level` (main process) or `log_level_replica` (others) to our loggers.

    "passive" leaves the level as the application set it. Like transformers, print to stderr when
    the application configured no logging at all.
    """
    chosen = args.log_level if args.should_log else args.log_level_replica
    if chosen == "passive":
        return
    PACKAGE_LOGGER.setLevel(args.get_process_log_level())
    if not PACKAGE_LOGGER.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(levelname)s|%(name)s] %(message)s"))
        PACKAGE_LOGGER.addHandler(handler)
