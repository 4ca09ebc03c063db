"""Async saves of a sharded model, 2 processes (ZeRO-3 and FSDP2, gloo): training waits only while each rank copies its
own shard into its arena (model / 2 per rank, not the whole checkpoint on rank 0); the module-by-module gathers and
the writes run in the background, on the background saves' own process group, while training goes on. The
checkpoints are true snapshots: they equal the live model at their step although later optimizer steps ran before
they were written."""

from __future__ import annotations

import pytest

import checks
from launch import deepspeed_op, launched  # noqa: F401 (fixtures)
from open_instruct_ckpt import verify_checkpoint

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_background_gathers_write_a_true_snapshot_from_each_ranks_own_shard(launched, engine):
    run = launched("--engine", engine, "--async-save", "--slow-disk", "0.6", "--max-steps", "4").check()
    writer, other = run.report(0), run.report(1)
    for step in checks.SAVE_STEPS:  # each save's files were written while the next steps trained
        assert verify_checkpoint(run.checkpoints / f"step_{step}") == []
        checks.full_model_matches_live(run, step)
    started = writer["save_started"]
    assert float(started["4"]) - float(started["2"]) < 0.6  # step 4 began before the slow step-2 write could end
    model = writer["model_bytes"]
    assert 0 < other["staging_capacity"] <= model / 2 + 4096  # rank 1's arena holds its half, nothing more
    assert 0 < writer["staging_capacity"] <= model / 2 + 4096  # so does the writer's: no whole checkpoint on rank 0
    checks.nonwriter_wrote_nothing(run)
