"""Node-local disks: with `save_on_each_node=True` the Trainer makes every node's local rank 0 a publisher.

Each publisher then writes a whole checkpoint into `output_dir` on its own node. That is right only
when `output_dir` is a disk of that node (local scratch): on a filesystem the nodes share, two
publishers would write the same paths. The flag does not say which it is, so at start every
publisher writes a probe file into `output_dir` and looks for the others' probes; seeing one means
the storage is shared, and every rank raises the same error naming the fix, before training.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

from .._dist import from_rank_zero, gather_to_all, raise_on_all_ranks
from .._errors import CheckpointError, explained
from .roles import Team
from .settings import SaveSettings

PROBE_PREFIX = ".open_instruct_ckpt.node-probe-"
SHARED_FIX = ("save_on_each_node=False (rank 0 writes every checkpoint once, for all nodes) on shared storage, "
              "or an output_dir on each node's own disk (local scratch such as $TMPDIR) with save_on_each_node=True")


def publishers(team: Team) -> list[int]:
    """Collective: the ranks that publish, in rank order (one per node with save_on_each_node=True)."""
    return [rank for rank, publishes in enumerate(gather_to_all(team.publishes)) if publishes]


def publisher_index(team: Team) -> int | None:
    """Collective: this publisher's place among the publishers (its node, 0 for rank 0); None elsewhere."""
    ranks = publishers(team)
    return ranks.index(team.rank) if team.publishes and team.rank in ranks else None


def same_run_everywhere(settings: SaveSettings) -> SaveSettings:
    """Collective: rank 0's run identity on every rank, so every node's copy of a checkpoint names the same run."""
    return dataclasses.replace(settings, run=from_rank_zero(settings.run))


def check_one_publisher_per_disk(output_dir: Path, team: Team) -> None:
    """Collective, at on_train_begin: with several publishers, prove that no two of them write into one directory.

    Each publisher creates `<output_dir>/.open_instruct_ckpt.node-probe-<rank>-<id>`; once every probe is
    written (the gather is the barrier), each looks for the others'. A failure is raised on every rank.
    """
    ranks = publishers(team)
    if len(ranks) < 2:
        return
    probe, error = None, None
    if team.publishes:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            probe = output_dir / f"{PROBE_PREFIX}{team.rank}-{uuid.uuid4().hex[:12]}"
            probe.write_bytes(b"")
        except OSError as exc:
            error = explained(exc, output_dir)
    names = gather_to_all(probe.name if probe is not None else None)
    if probe is not None and error is None:
        error = _shared_with(output_dir, team.rank, ranks, names)
    try:
        raise_on_all_ranks(error)
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)


def _shared_with(output_dir: Path, rank: int, ranks: list[int], names: list[str | None]) -> CheckpointError | None:
    seen = [other for other, name in enumerate(names) if other != rank and name and (output_dir / name).exists()]
    if not seen:
        return None
    return CheckpointError(
        f"save_on_each_node=True makes ranks {', '.join(map(str, ranks))} (each node's local rank 0) write whole "
        f"checkpoints into output_dir {output_dir}, but rank {rank} sees the probe file that rank {seen[0]} wrote "
        f"there: this storage is shared by the nodes, and they would overwrite each other's checkpoints. Use "
        f"{SHARED_FIX}"
    )
