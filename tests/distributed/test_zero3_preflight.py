"""A writer-side problem found before the first gather stops every rank with the same error, without hanging.

Both launches keep the Trainer's checkpoints with stage3_gather_16bit_weights_on_model_save=true, one
configured through TrainingArguments(deepspeed=...), the other as `accelerate launch --config_file`
passes it: each must log the warning at init.
"""

from __future__ import annotations

import pytest

from launch import deepspeed_op, launched  # noqa: F401 (fixtures)

pytestmark = pytest.mark.distributed
GATHER_16BIT_WARNING = "stage3_gather_16bit_weights_on_model_save=true makes the Trainer gather the whole model"


@pytest.fixture(scope="module")
def full_disk(launched):
    # Rank 0 alone sees a full disk from step 1; the save at step 2 must fail on both ranks.
    return launched(
        "--strategy", "full", "--engine", "zero3", "--fail-free-space-at-step", "1",
        "--gather-16bit", "--trainer-checkpoints", "--expect-error",
    ).check_expected_error()


def test_writer_preflight_failure_raises_on_every_rank_quickly(full_disk):
    writer, other = full_disk.report(0), full_disk.report(1)
    assert writer["error"].startswith("CheckpointError: not enough disk space in ")
    assert other["error"] == f"CheckpointError: checkpoint save failed on rank 0: {writer['error']}"
    for report in (writer, other):
        assert report["error_at"] - report["save_started"]["2"] < 10  # not the 120 s process-group timeout
    assert not any(p.name.startswith(("step_", ".tmp-")) for p in full_disk.checkpoints.iterdir())
    assert other["audit"] == []


@pytest.fixture(scope="module")
def disk_fills_mid_save(launched):
    # Small shards: the first shard is written while later modules still have to be gathered.
    return launched(
        "--strategy", "full", "--engine", "zero3", "--max-shard-size", "20000", "--fail-shard-write-at-step", "1",
        "--gather-16bit", "--trainer-checkpoints", "--ds-config-from-accelerate", "--expect-error",
    ).check_expected_error()


@pytest.mark.parametrize("run", ["full_disk", "disk_fills_mid_save"], ids=["TrainingArguments", "accelerate-config"])
def test_warns_when_trainer_would_gather_the_full_model(run, request):
    writer, other = request.getfixturevalue(run).report(0), request.getfixturevalue(run).report(1)
    assert [m for m in writer["warnings"] if GATHER_16BIT_WARNING in m]
    assert not [m for m in other.get("warnings", []) if GATHER_16BIT_WARNING in m]  # init messages: the writer's


def test_write_failure_mid_gather_reaches_every_rank_after_all_gathers(disk_fills_mid_save):
    writer, other = disk_fills_mid_save.report(0), disk_fills_mid_save.report(1)
    assert writer["error"].startswith("CheckpointError: writing checkpoint ")
    assert "No space left on device" in writer["error"] and "free disk space" in writer["error"]
    assert other["error"] == f"CheckpointError: checkpoint save failed on rank 0: {writer['error']}"
    # The writer kept entering every gather after its write failed, so both ranks gathered everything.
    assert writer["gathered"] == other["gathered"] and len(writer["gathered"]) == writer["params"]
    for report in (writer, other):
        assert report["error_at"] - report["save_started"]["2"] < 10  # not the 120 s process-group timeout
    assert not any(p.name.startswith(("step_", ".tmp-")) for p in disk_fills_mid_save.checkpoints.iterdir())
