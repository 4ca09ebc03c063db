"""The auto interval is one decision on every rank: rank 0's proposal, broadcast (2 real gloo ranks)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from open_instruct_ckpt._when.policy import AutoSchedule

pytestmark = pytest.mark.distributed


def _rank(rank: int, work: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{work}/store", rank=rank, world_size=2)
    try:
        policy = AutoSchedule(max_interval=None)
        policy.start(SimpleNamespace(), SimpleNamespace(save_steps=10, max_steps=100, global_step=0))
        policy.saved(10)
        policy.adopt(4 if rank == 0 else 7)  # only rank 0 (the writer) measured 4; rank 1's 7 is ignored
        first = policy.interval
        policy.saved(14)
        policy.adopt(None if rank else 25)  # above save_steps: bounded to 10 on every rank
        Path(work, f"rank{rank}.json").write_text(json.dumps([first, policy.interval]))
    finally:
        dist.destroy_process_group()


def test_every_rank_adopts_rank_zeros_interval(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path),), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results == [[4, 10], [4, 10]]
