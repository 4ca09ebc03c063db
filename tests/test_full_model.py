"""FullModel through a real Trainer: loadable with stock loaders, logits identical, ties kept."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, TrainerCallback

from conftest import logits, make_trainer
from open_instruct_ckpt import CheckpointCallback, FullModel
from open_instruct_ckpt.tiny import llama_model


class RecordLogits(TrainerCallback):
    """Reference logits of the live model at every step (runs after CheckpointCallback)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.by_step = tokenizer, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.by_step[state.global_step] = logits(model, self.tokenizer).clone()
        model.train()


@pytest.mark.parametrize("tie", [False, True])
def test_checkpoints_load_with_auto_classes_and_reproduce_logits(tmp_path, tokenizer, tie):
    model = llama_model(tokenizer, tie=tie)
    recorder = RecordLogits(tokenizer)
    trainer = make_trainer(model, tokenizer, tmp_path, CheckpointCallback(FullModel()))
    trainer.add_callback(recorder)
    trainer.train()

    for step in (2, 4):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / f"step_{step}")
        assert type(loaded).__name__ == "LlamaForCausalLM"
        assert torch.equal(logits(loaded, tokenizer), recorder.by_step[step])
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert torch.equal(logits(final, tokenizer), recorder.by_step[4])
    if tie:
        assert final.lm_head.weight.data_ptr() == final.model.embed_tokens.weight.data_ptr()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert reloaded_tokenizer("the model saves")["input_ids"] == tokenizer("the model saves")["input_ids"]
    assert GenerationConfig.from_pretrained(tmp_path / "final").eos_token_id == tokenizer.eos_token_id


def test_final_hard_links_the_last_step_instead_of_saving_again(tmp_path, tokenizer, llama):
    make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel())).train()
    step_weights, final_weights = tmp_path / "step_4" / "model.safetensors", tmp_path / "final" / "model.safetensors"
    assert step_weights.stat().st_ino == final_weights.stat().st_ino
    assert not (tmp_path / "final").is_symlink()
    manifest = json.loads((tmp_path / "final" / "checkpoint.json").read_text())
    assert manifest["step"] == 4 and manifest["name"] == "final" and manifest["linked_from"] == "step_4"


def test_manifest_lists_files_step_strategy_and_versions(tmp_path, tokenizer, llama):
    make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel())).train()
    manifest = json.loads((tmp_path / "step_2" / "checkpoint.json").read_text())
    assert manifest["step"] == 2
    assert manifest["strategy"] == "FullModel(max_shard_size=None)"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(manifest["files"])
    assert {"torch", "transformers", "safetensors"} <= set(manifest["versions"])
    on_disk = (tmp_path / "step_2" / "model.safetensors").stat().st_size
    assert manifest["files"]["model.safetensors"]["bytes"] == on_disk


def test_live_model_config_is_not_mutated_by_a_save(tmp_path, tokenizer, llama):
    before = llama.config.to_dict()
    generation_before = llama.generation_config.to_dict()
    make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel(), generation_config={"max_new_tokens": 7})).train()
    assert llama.generation_config.to_dict() == generation_before
    assert llama.config.architectures == before.get("architectures")
    assert GenerationConfig.from_pretrained(tmp_path / "final").max_new_tokens == 7


def test_peft_model_is_rejected_with_a_pointer_to_lora_adapter(tmp_path, tokenizer, llama):
    peft_model = get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"FullModel got a PEFT model; use LoRAAdapter\(\)"):
        make_trainer(peft_model, tokenizer, tmp_path, CheckpointCallback(FullModel()))
