"""Who does what in a save, decided once per run (as torch DCP tells a storage writer it is the coordinator).

- PUBLISHER (`args.should_save`): writes its files and the small ones, seals and publishes the checkpoint.
- SHARD_WRITER (`writers="all"`, every other rank): writes its share of the shard files into the
  publisher's staging directory, on a filesystem shared by every rank.
- PARTICIPANT: takes part in the collective gathers and writes nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .plan import Layout, WritePlan
from .shards import files_of_rank


class Role(enum.Enum):
    PUBLISHER = "publisher"
    SHARD_WRITER = "shard writer"
    PARTICIPANT = "participant"


@dataclass(frozen=True)
class Team:
    """This rank's role in every save of the run, and how the ranks share the files."""

    role: Role
    rank: int = 0
    world_size: int = 1
    writers: str = "main"

    @property
    def writes(self) -> bool:
        return self.role is not Role.PARTICIPANT

    @property
    def publishes(self) -> bool:
        return self.role is Role.PUBLISHER

    @property
    def shares_files(self) -> bool:
        """Several ranks write the files of one checkpoint (writers="all" in a distributed run)."""
        return self.writers == "all" and self.world_size > 1

    def owned(self, layout: Layout) -> set[str] | None:
        """The files of `layout` this rank writes; None for all of them."""
        return files_of_rank(layout, self.rank, self.world_size) if self.shares_files else None

    def share_bytes(self, plan: WritePlan) -> int:
        """Bytes of the files of `plan` this rank writes (all of them for a publisher with writers="main")."""
        if not self.writes:
            return 0
        total = 0
        for _, sub in plan.walk():
            layout, owned = sub.weights.layout, self.owned(sub.weights.layout)
            total += layout.bytes_of([n for f, names in layout.files.items() if owned is None or f in owned
                                      for n in names])
        return total


def team_for(should_save: bool, writers: str, rank: int = 0, world_size: int = 1) -> Team:
    """The role of this rank: the Trainer's writer publishes; with writers="all" every other rank writes shards."""
    if should_save:
        role = Role.PUBLISHER
    elif writers == "all" and world_size > 1:
        role = Role.SHARD_WRITER
    else:
        role = Role.PARTICIPANT
    return Team(role, rank, world_size, writers)


SOLO = Team(Role.PUBLISHER)  # one process: it gathers nothing from others and writes everything
