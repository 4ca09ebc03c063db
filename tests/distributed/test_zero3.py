"""Every strategy under 2-process DeepSpeed ZeRO-3 (gloo on CPU), with a real Trainer.train()."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

import checks
from launch import deepspeed_op, launched  # noqa: F401 (fixtures)

pytestmark = pytest.mark.distributed
SHARD_BYTES = "30000"  # ~96 KB model: 4 shards


@pytest.fixture(scope="module")
def full(launched):
    return launched("--strategy", "full", "--engine", "zero3", "--tie", "--max-shard-size", SHARD_BYTES).check()


@pytest.fixture(scope="module")
def lora(launched):
    return launched("--strategy", "lora", "--engine", "zero3").check()


@pytest.fixture(scope="module")
def attribute(launched):
    return launched("--strategy", "attribute", "--engine", "zero3").check()


def test_full_model_checkpoint_equals_gathered_live_model(full):
    checks.sharded(full)
    logits = [checks.full_model_matches_live(full, step) for step in checks.SAVE_STEPS]
    assert not torch.equal(*logits)  # the two saves captured different training states
    weight_map = json.loads((full.checkpoints / "step_4" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in weight_map and len(set(weight_map.values())) > 1  # tied and sharded


def test_full_model_streams_shards_within_one_shard_plus_largest_module(full):
    writer = full.report(0)
    assert writer["peaks"] and all(
        0 < peak <= int(SHARD_BYTES) + writer["largest_group_bytes"] for peak in writer["peaks"]
    )
    assert max(writer["peaks"]) < writer["model_bytes"]


@pytest.mark.parametrize("run", ["full", "attribute"])
def test_gathers_one_module_at_a_time(run, request):
    checks.gathers_module_by_module(request.getfixturevalue(run))


def test_lora_adapter_equals_live_trainable_tensors(lora):
    checks.sharded(lora)
    for step in checks.SAVE_STEPS:
        checks.lora_matches_live(lora, step)


def test_lora_save_gathers_only_trainable_parameters(lora):
    checks.lora_gathered_only_the_adapter(lora)


def test_model_attribute_saves_and_gathers_only_the_policy(attribute):
    checks.sharded(attribute)
    for step in checks.SAVE_STEPS:
        checks.full_model_matches_live(attribute, step, loader=LlamaForCausalLM)
    for rank in (0, 1):
        names = {name for name, _ in attribute.report(rank)["gathered"]}
        assert names and all(name.startswith("policy.") for name in names), names


@pytest.mark.parametrize("run", ["full", "lora", "attribute"])
def test_nonwriter_rank_writes_nothing(run, request):
    checks.nonwriter_wrote_nothing(request.getfixturevalue(run))


def test_no_trainer_gather_warning_when_disabled(full):
    assert not any("stage3_gather_16bit" in message for message in full.report(0).get("warnings", []))


def test_merged_lora_final_gathers_the_base_and_loads_without_peft(launched):
    run = launched("--strategy", "lora", "--engine", "zero3", "--merged-final").check()
    checks.sharded(run)
    checks.merged_lora_matches_live(run, 4)
