"""The free-space check estimates the real checkpoint size (within 10% + 1 MB), not a fixed allowance."""

import shutil
from collections import namedtuple

import pytest
from peft import LoraConfig, get_peft_model

from conftest import entries, make_trainer
from open_instruct_ckpt import CheckpointCallback, FullModel, LoRAAdapter
from open_instruct_ckpt._write.generation_config import build as generation_config
from open_instruct_ckpt._write.prepare import measure_small_files
from open_instruct_ckpt._write.settings import SaveSettings
from open_instruct_ckpt.tiny import llama_model

Usage = namedtuple("Usage", "total used free")


def size_on_disk(checkpoint):
    return sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())


def lora(tokenizer):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(llama_model(tokenizer), config)


@pytest.mark.parametrize("strategy,build", [(FullModel(), llama_model), (LoRAAdapter(), lora)])
def test_estimate_is_within_ten_percent_plus_one_megabyte(tmp_path, tokenizer, strategy, build):
    model = build(tokenizer)
    make_trainer(model, tokenizer, tmp_path, CheckpointCallback(strategy), max_steps=2).train()
    settings, plan = SaveSettings(tokenizer, None, tmp_path, None), strategy.plan(model)
    small_files = measure_small_files(settings, plan, generation_config(None, strategy.saved_module(model), tokenizer))
    real, estimate = size_on_disk(tmp_path / "step_2"), plan.stored_bytes + small_files
    assert real <= estimate <= real * 1.1 + 1_000_000, (real, estimate)


def test_tiny_model_trains_on_an_80_mib_disk(tmp_path, tokenizer, llama, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(80 * 2**20, 0, 80 * 2**20))
    make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel(), keep_last=2), max_steps=4).train()
    assert entries(tmp_path) == {"step_2", "step_4", "final"}
