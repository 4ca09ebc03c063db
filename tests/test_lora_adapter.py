"""LoRAAdapter through a real Trainer: PEFT's own format, exact size, loadable, non-zero lora_B."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import entries, make_trainer
from open_instruct_ckpt import CheckpointCallback, LoRAAdapter
from open_instruct_ckpt.tiny import llama_model

RANK = 4
TARGETS = ["q_proj", "v_proj", "down_proj"]


class RecordAdapter(TrainerCallback):
    """Copies of the live trainable tensors at every step."""

    def __init__(self):
        self.by_step = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.by_step[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_lora(tmp_path, tokenizer, config, strategy=None, base=None):
    model = get_peft_model(base if base is not None else llama_model(tokenizer), config)
    recorder = RecordAdapter()
    trainer = make_trainer(model, tokenizer, tmp_path, CheckpointCallback(strategy or LoRAAdapter()))
    trainer.add_callback(recorder)
    trainer.train()
    return model, recorder


def adapter_bytes(directory):
    return sum(t.numel() * t.element_size() for t in load_file(directory / "adapter_model.safetensors").values())


def expected_lora_bytes(base, rank, targets):
    total = 0
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets:
            total += rank * (module.in_features + module.out_features) * 4  # PEFT keeps adapters in fp32
    return total


def assert_loaded_adapter_equals_live(directory, tokenizer, live, base=None):
    base = base if base is not None else llama_model(tokenizer)
    loaded = PeftModel.from_pretrained(base, directory)
    loaded_params = dict(loaded.named_parameters())
    assert live, "nothing trainable was recorded"
    for name, tensor in live.items():
        assert torch.equal(loaded_params[name], tensor), name
    return loaded


def test_plain_lora_adapter_has_exact_size_and_round_trips(tmp_path, tokenizer):
    model, recorder = train_lora(tmp_path, tokenizer, LoraConfig(r=RANK, lora_alpha=8, target_modules=TARGETS))
    final = tmp_path / "final"
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "checkpoint.json"} <= entries(final)
    assert "model.safetensors" not in entries(final)
    expected = expected_lora_bytes(llama_model(tokenizer), RANK, TARGETS)
    assert adapter_bytes(final) == expected
    full_bytes = sum(p.numel() * p.element_size() for p in llama_model(tokenizer).parameters())
    assert adapter_bytes(final) < full_bytes / 5
    for step in (2, 4):
        assert_loaded_adapter_equals_live(tmp_path / f"step_{step}", tokenizer, recorder.by_step[step])
    saved = load_file(final / "adapter_model.safetensors")
    lora_b = [t for n, t in saved.items() if "lora_B" in n]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)


def test_modules_to_save_are_saved_and_restored(tmp_path, tokenizer):
    config = LoraConfig(r=RANK, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model, recorder = train_lora(tmp_path, tokenizer, config)
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert any("lm_head" in name for name in saved)
    assert_loaded_adapter_equals_live(tmp_path / "final", tokenizer, recorder.by_step[4])


def test_resized_vocabulary_with_targeted_embeddings(tmp_path, tokenizer):
    tokenizer.add_tokens(["newtoken1", "newtoken2", "newtoken3"])
    base = llama_model(tokenizer)  # built from len(tokenizer): already the new size
    base.resize_token_embeddings(len(tokenizer) + 5)
    config = LoraConfig(r=RANK, target_modules=["embed_tokens", "q_proj"])
    model, recorder = train_lora(tmp_path, tokenizer, config, base=base)
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    embedding = [t for n, t in saved.items() if n.endswith("embed_tokens.base_layer.weight")]
    assert embedding and embedding[0].shape[0] == len(tokenizer) + 5
    fresh_base = llama_model(tokenizer)
    fresh_base.resize_token_embeddings(len(tokenizer) + 5)
    loaded = assert_loaded_adapter_equals_live(tmp_path / "final", tokenizer, recorder.by_step[4], base=fresh_base)
    live_embedding = model.get_input_embeddings().base_layer.weight
    assert torch.equal(loaded.get_input_embeddings().base_layer.weight, live_embedding)


def test_adapter_config_is_peft_format_with_generation_config(tmp_path, tokenizer):
    train_lora(tmp_path, tokenizer, LoraConfig(r=RANK, target_modules=TARGETS))
    config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["peft_type"] == "LORA"
    assert json.loads((tmp_path / "final" / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id


def test_non_peft_model_is_rejected(tmp_path, tokenizer, llama):
    with pytest.raises(TypeError, match=r"LoRAAdapter needs a peft.PeftModel, got LlamaForCausalLM"):
        make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(LoRAAdapter()))


def test_save_reads_only_the_trainable_adapter_tensors(tmp_path, tokenizer, monkeypatch):
    """What a save hands to the gather is what ZeRO-3/FSDP2 would materialise: never the frozen base."""
    from open_instruct_ckpt._write import executor

    read = []
    real = executor.for_each_module_state

    def spy(groups, consume, **kwargs):
        read.extend(name for _, tensors in groups for name in tensors)
        return real(groups, consume, **kwargs)

    monkeypatch.setattr(executor, "for_each_module_state", spy)
    config = LoraConfig(r=RANK, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model, _ = train_lora(tmp_path, tokenizer, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert read and set(read) == trainable and len(read) == 2 * len(trainable)  # two saves, adapter only
    assert all(".lora_A." in name or ".lora_B." in name for name in read)
