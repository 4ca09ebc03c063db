"""Every strategy under 2-process torch FSDP2 through accelerate (gloo on CPU), with a real Trainer.train().

The parameters really are DTensors sharded on dim 0 and the model's class is swapped to
`FSDPLlamaForCausalLM`; the checkpoints must still equal the full live weights, name the model's
own class, and come from a gather that holds one module at a time. FSDP1 is refused at init.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

import checks
from launch import deepspeed_op, launched  # noqa: F401 (fixtures)
from open_instruct_ckpt import verify_checkpoint

pytestmark = pytest.mark.distributed
SHARD_BYTES = "30000"  # ~96 KB model: 4 shards
FULL_STATE_DICT_WARNING = "FSDP state_dict_type FULL_STATE_DICT makes the Trainer gather the whole model"


@pytest.fixture(scope="module")
def sharded(launched):
    # An evaluation-like forward before each save leaves the root and the tail unsharded.
    return launched(
        "--strategy", "full", "--engine", "fsdp2", "--tie", "--max-shard-size", SHARD_BYTES, "--forward-before-save",
    ).check()


@pytest.fixture(scope="module")
def offload_preempted(launched):
    # Unsharded files, CPU offload, saves at 2 and 4, SIGUSR1 to rank 1 in step 5, keep_last=2.
    return launched(
        "--strategy", "full", "--engine", "fsdp2", "--offload", "--max-steps", "6", "--keep-last", "2",
        "--sigusr1-at-step", "5",
    ).check()


@pytest.fixture(scope="module")
def lora(launched):
    # The embedding layers are saved too; the forward before each save leaves the tail (lm_head) unsharded.
    return launched("--strategy", "lora", "--engine", "fsdp2", "--lora-embeddings", "--forward-before-save").check()


@pytest.fixture(scope="module")
def attribute(launched):
    return launched("--strategy", "attribute", "--engine", "fsdp2").check()


def test_parameters_are_fsdp2_dtensors_when_saves_begin(sharded):
    for rank in (0, 1):
        assert sharded.report(rank)["wrapped"] == "FSDPLlamaForCausalLM"
    checks.sharded(sharded)


def test_full_model_checkpoint_equals_gathered_live_model(sharded, tmp_path):
    logits = [checks.full_model_matches_live(sharded, step) for step in checks.SAVE_STEPS]
    assert not torch.equal(*logits)  # the two saves captured different training states
    step_4 = sharded.checkpoints / "step_4"
    weight_map = json.loads((step_4 / checks.INDEX).read_text())["weight_map"]
    assert "lm_head.weight" not in weight_map and len(set(weight_map.values())) > 1  # tied and sharded
    checks.same_files_as_save_pretrained(sharded, 4, tmp_path, tie=True, max_shard_size=int(SHARD_BYTES))


def test_save_after_a_forward_still_gathers_every_parameter(sharded):
    # The forward left the root and the tail holding unsharded parameters (in the compute dtype under
    # mixed precision); the save puts the shards back first, so all of them go through the gather.
    for rank in (0, 1):
        report = sharded.report(rank)
        assert len(report["gathered"]) == report["params"] * len(checks.SAVE_STEPS)


@pytest.mark.parametrize("run", ["sharded", "attribute"])
def test_gathers_one_module_at_a_time(run, request):
    checks.gathers_module_by_module(request.getfixturevalue(run))


def test_full_model_streams_shards_within_one_shard_plus_largest_module(sharded):
    writer = sharded.report(0)
    assert writer["peaks"] and all(
        0 < peak <= int(SHARD_BYTES) + writer["largest_group_bytes"] for peak in writer["peaks"]
    )
    assert max(writer["peaks"]) < writer["model_bytes"]


def test_offloaded_model_saves_on_schedule_keeps_last_two_and_saves_on_sigusr1(offload_preempted, tmp_path):
    for rank in (0, 1):
        report = offload_preempted.report(rank)
        assert report["offload_policy"].startswith("CPUOffloadPolicy(") and report["param_devices"] == ["cpu"]
        assert report["preempted"] and report["stopped_at"] == 5
    checks.sharded(offload_preempted)  # the scheduled saves at steps 2 and 4
    remaining = sorted(p.name for p in offload_preempted.checkpoints.iterdir() if not p.name.startswith("."))
    assert remaining == ["step_4", "step_5"]  # step_2 pruned, no final/ after a preemption
    for step in (4, 5):
        assert verify_checkpoint(offload_preempted.checkpoints / f"step_{step}") == []
        checks.full_model_matches_live(offload_preempted, step)
    checks.same_files_as_save_pretrained(offload_preempted, 5, tmp_path)
    checks.gathers_module_by_module(offload_preempted, saves=3)


def test_lora_adapter_equals_live_trainable_tensors_and_gathers_only_them(lora):
    checks.sharded(lora)
    for step in checks.SAVE_STEPS:
        checks.lora_matches_live(lora, step, embeddings=True)
    # The unsharded lm_head left by the forward was put back in its shards and gathered like the rest.
    checks.lora_gathered_only_the_adapter(lora, embeddings=True)


def test_model_attribute_saves_and_gathers_only_the_policy(attribute):
    checks.sharded(attribute)
    for step in checks.SAVE_STEPS:
        checks.full_model_matches_live(attribute, step, loader=LlamaForCausalLM)
    config = json.loads((attribute.checkpoints / "step_4" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    for rank in (0, 1):
        names = {name for name, _ in attribute.report(rank)["gathered"]}
        assert names and all(name.startswith("policy.") for name in names), names


@pytest.mark.parametrize("run", ["sharded", "offload_preempted", "lora", "attribute"])
def test_nonwriter_rank_writes_nothing(run, request):
    checks.nonwriter_wrote_nothing(request.getfixturevalue(run))


def test_no_trainer_checkpoint_warning_when_they_are_skipped(sharded):
    assert not any(FULL_STATE_DICT_WARNING in m for m in sharded.report(0).get("warnings", []))


def test_fsdp1_is_refused_when_the_trainer_is_built(launched):
    run = launched("--strategy", "full", "--engine", "fsdp1", "--expect-error").check_expected_error()
    for rank in (0, 1):
        report = run.report(rank)
        assert report["error"].startswith("ValueError: CheckpointCallback cannot save this model: fsdp_version=1: ")
        assert "fsdp_config={'version': 2" in report["error"] and "fsdp_version: 2" in report["error"]
        assert "sharded_params" not in report and report["peaks"] == []  # training never began
    assert not run.checkpoints.exists() or not any(run.checkpoints.iterdir())


@pytest.fixture(scope="module")
def disk_fills_mid_save(launched):
    # Trainer checkpoints kept with FSDP's default FULL_STATE_DICT: the init warning. The first save fails
    # on the writer after its first shard while later modules still have to be gathered.
    return launched(
        "--strategy", "full", "--engine", "fsdp2", "--max-shard-size", "20000", "--fail-shard-write-at-step", "1",
        "--trainer-checkpoints", "--expect-error",
    ).check_expected_error()


def test_write_failure_mid_gather_reaches_every_rank_after_all_gathers(disk_fills_mid_save):
    writer, other = disk_fills_mid_save.report(0), disk_fills_mid_save.report(1)
    assert writer["error"].startswith("CheckpointError: writing checkpoint ")
    assert other["error"] == f"CheckpointError: checkpoint save failed on rank 0: {writer['error']}"
    assert writer["gathered"] == other["gathered"] and len(writer["gathered"]) == writer["params"]
    for report in (writer, other):
        assert report["error_at"] - report["save_started"]["2"] < 10  # not the 120 s process-group timeout
    assert not any(p.name.startswith(("step_", ".tmp-")) for p in disk_fills_mid_save.checkpoints.iterdir())


def test_warns_when_trainer_would_gather_the_full_model(disk_fills_mid_save):
    assert [m for m in disk_fills_mid_save.report(0)["warnings"] if FULL_STATE_DICT_WARNING in m]


def test_merged_lora_final_gathers_the_base_and_loads_without_peft(launched):
    run = launched("--strategy", "lora", "--engine", "fsdp2", "--merged-final").check()
    checks.sharded(run)
    checks.merged_lora_matches_live(run, 4)
