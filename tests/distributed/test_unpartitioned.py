"""FullModel and LoRAAdapter under 2-process ZeRO-2 and plain DDP: nothing to gather, only the writer writes."""

from __future__ import annotations

import pytest

import checks
from launch import deepspeed_op, launched  # noqa: F401 (fixtures)

pytestmark = pytest.mark.distributed


WRAPPER = {"zero2": "DeepSpeedEngine", "ddp": "DistributedDataParallel"}


@pytest.mark.parametrize("engine", ["zero2", "ddp"])
def test_full_model_under(engine, launched):
    run = launched("--strategy", "full", "--engine", engine).check()
    assert {run.report(rank)["wrapped"] for rank in (0, 1)} == {WRAPPER[engine]}
    checks.not_sharded(run)
    for step in checks.SAVE_STEPS:
        checks.full_model_matches_live(run, step)
    checks.nonwriter_wrote_nothing(run)


@pytest.mark.parametrize("engine", ["zero2", "ddp"])
def test_lora_adapter_under(engine, launched):
    run = launched("--strategy", "lora", "--engine", engine).check()
    checks.not_sharded(run)
    for step in checks.SAVE_STEPS:
        checks.lora_matches_live(run, step)
    checks.nonwriter_wrote_nothing(run)
