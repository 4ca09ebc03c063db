"""Async saves, 2 processes (ZeRO-3, gloo): a background write failure on the writer reaches every rank at the
next step end, with the same message, and leaves the previous checkpoint valid; a clean async run matches
the live weights."""

from __future__ import annotations

import pytest

from launch import deepspeed_op, launched  # noqa: F401 (fixtures)
from open_instruct_ckpt import verify_checkpoint

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def fails_in_background(launched):
    # Rank 0's disk fills after step 3: the step-4 save fails in the background; step_2 was published.
    return launched(
        "--strategy", "full", "--engine", "zero3", "--async-save", "--max-steps", "8",
        "--fail-shard-write-at-step", "3", "--expect-error",
    ).check_expected_error()


def test_background_failure_reaches_every_rank_at_next_step_end(fails_in_background):
    writer, other = fails_in_background.report(0), fails_in_background.report(1)
    assert writer["error"].startswith("CheckpointError: writing checkpoint ") and "step_4" in writer["error"]
    assert "No space left on device" in writer["error"]
    assert other["error"] == f"CheckpointError: checkpoint save failed on rank 0: {writer['error']}"
    assert writer["stopped_at"] == other["stopped_at"] == 5  # the step end after the save, not a later save


def test_previous_checkpoint_stays_valid(fails_in_background):
    ckpt = fails_in_background.checkpoints
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith(("step_", ".tmp-"))) == ["step_2"]
    assert verify_checkpoint(ckpt / "step_2") == []
    assert fails_in_background.report(1)["audit"] == []  # the non-writer wrote nothing, async or not
