"""LoRAAdapter(merged_final=True) through a real Trainer: final/merged/ loads without PEFT and matches the PEFT model."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import entries, logits, make_trainer
from open_instruct_ckpt import CheckpointCallback, LoRAAdapter, verify_checkpoint
from open_instruct_ckpt._write.saver import save_once
from open_instruct_ckpt.tiny import llama_model

TARGETS = ["q_proj", "v_proj", "down_proj"]
ATOL = 1e-5  # fp32: the merged model's logits against the live, unmerged PEFT model's


def lora_config(**overrides):
    settings = dict(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    settings.update(overrides)
    return LoraConfig(**settings)


def train_merged(tmp_path, tokenizer, config=None, **trainer_overrides):
    model = get_peft_model(llama_model(tokenizer), config or lora_config())
    trainer = make_trainer(model, tokenizer, tmp_path, CheckpointCallback(LoRAAdapter(merged_final=True)),
                           **trainer_overrides)
    trainer.train()
    return model


def live_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_merged_final_loads_without_peft_and_matches_the_peft_model(tmp_path, tokenizer):
    model = train_merged(tmp_path, tokenizer)
    merged_dir = tmp_path / "final" / "merged"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= entries(merged_dir)
    assert json.loads((merged_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not any("lora" in name or "base_layer" in name for name in load_file(merged_dir / "model.safetensors"))

    served = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not isinstance(served, PeftModel)
    expected = logits(model, tokenizer)
    difference = (logits(served, tokenizer) - expected).abs().max().item()
    assert difference <= ATOL, difference
    reference = copy.deepcopy(model).merge_and_unload()
    assert torch.equal(logits(served, tokenizer), logits(reference, tokenizer))
    reference.save_pretrained(tmp_path / "reference")
    assert load_file(merged_dir / "model.safetensors").keys() == load_file(tmp_path / "reference" / "model.safetensors").keys()
    served_state = served.state_dict()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(served_state[name], tensor), name
    assert AutoTokenizer.from_pretrained(merged_dir).get_vocab() == tokenizer.get_vocab()
    assert verify_checkpoint(tmp_path / "final") == []
    manifest = json.loads((tmp_path / "final" / "checkpoint.json").read_text())
    assert "merged/model.safetensors" in manifest["files"]


def test_the_training_model_is_untouched_and_steps_stay_adapter_only(tmp_path, tokenizer):
    from open_instruct_ckpt._write import merge as _merged_lora

    model = get_peft_model(llama_model(tokenizer), lora_config())
    trainer = make_trainer(model, tokenizer, tmp_path, CheckpointCallback(LoRAAdapter(merged_final=True)))
    trainer.train()
    before = live_snapshot(model)
    save_once(LoRAAdapter(merged_final=True), model, tokenizer, tmp_path / "again", "final", 4, final=True)
    after = live_snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert isinstance(model, PeftModel)
    layers = _merged_lora._lora_layers(model.get_base_model())
    assert layers and not any(layer.merged for layer in layers.values())
    for step in (2, 4):
        assert "merged" not in entries(tmp_path / f"step_{step}")
        assert "model.safetensors" not in entries(tmp_path / f"step_{step}")
    assert "adapter_model.safetensors" in entries(tmp_path / "final")


def test_final_after_an_unsaved_last_step_is_merged_too(tmp_path, tokenizer):
    model = train_merged(tmp_path, tokenizer, max_steps=3)
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "final" / "merged")
    assert (logits(served, tokenizer) - logits(model, tokenizer)).abs().max().item() <= ATOL
    assert "linked_from" not in json.loads((tmp_path / "final" / "checkpoint.json").read_text())


def test_without_the_option_final_stays_linked_and_adapter_only(tmp_path, tokenizer):
    model = get_peft_model(llama_model(tokenizer), lora_config())
    make_trainer(model, tokenizer, tmp_path, CheckpointCallback(LoRAAdapter())).train()
    assert "merged" not in entries(tmp_path / "final")
    assert json.loads((tmp_path / "final" / "checkpoint.json").read_text())["linked_from"] == "step_4"


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (dict(use_dora=True), r"uses a LoRA variant such as DoRA"),
        (dict(modules_to_save=["lm_head"]), r"LoraConfig\(modules_to_save="),
        (dict(target_modules=["embed_tokens", "q_proj"]), r"embed_tokens is a Embedding over Embedding"),
        (dict(lora_bias=True, target_modules=["q_proj"]), None),
    ],
)
def test_unsupported_models_are_refused_before_training(tmp_path, tokenizer, config, match):
    base = llama_model(tokenizer)
    if config.get("lora_bias"):  # llama's projections have no bias: PEFT itself refuses; use a biased layer
        base.model.layers[0].self_attn.q_proj = torch.nn.Linear(*reversed(base.model.layers[0].self_attn.q_proj.weight.shape))
        config["target_modules"] = ["layers.0.self_attn.q_proj"]
        match = r"uses lora_bias"
    model = get_peft_model(base, lora_config(**config))
    with pytest.raises(ValueError, match=rf"LoRAAdapter\(merged_final=True\) cannot merge this model: .*{match}.*merge_and_unload"):
        make_trainer(model, tokenizer, tmp_path, CheckpointCallback(LoRAAdapter(merged_final=True)))


def test_two_adapters_are_refused(tmp_path, tokenizer):
    model = get_peft_model(llama_model(tokenizer), lora_config())
    model.add_adapter("other", lora_config())
    with pytest.raises(ValueError, match=r"2 adapters \(default, other\); it merges exactly one"):
        LoRAAdapter(merged_final=True).check(model)


def test_merged_final_must_be_a_bool():
    with pytest.raises(TypeError, match=r"LoRAAdapter\(merged_final='yes'\): use True or False"):
        LoRAAdapter(merged_final="yes")  # type: ignore[arg-type]


def test_fan_in_fan_out_layers_and_tied_embeddings_merge_like_peft(tmp_path, tokenizer):
    """GPT-2 keeps Conv1D weights transposed (fan_in_fan_out) and ties lm_head to the input embeddings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer)))
    model = get_peft_model(base, lora_config(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)  # as if trained: a zero lora_B would merge to the base
    gpt2_ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}  # GPT-2's are 50256
    save_once(LoRAAdapter(merged_final=True), model, tokenizer, tmp_path, "final", 1, final=True,
              generation_config=gpt2_ids)
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "final" / "merged")
    reference = copy.deepcopy(model).merge_and_unload()
    reference.save_pretrained(tmp_path / "reference")
    assert load_file(tmp_path / "final" / "merged" / "model.safetensors").keys() == \
        load_file(tmp_path / "reference" / "model.safetensors").keys()
    assert (logits(served, tokenizer) - logits(model, tokenizer)).abs().max().item() <= ATOL
    assert torch.equal(logits(served, tokenizer), logits(reference, tokenizer))
    with model.disable_adapter():
        assert (logits(model, tokenizer) - logits(served, tokenizer)).abs().max().item() > 1e-3


def test_a_sharded_merged_model_loads_like_save_pretrained(tmp_path, tokenizer, monkeypatch):
    from open_instruct_ckpt._write import merge as _merged_lora

    monkeypatch.setattr(_merged_lora, "DEFAULT_MAX_SHARD_SIZE", 64 * 1024)
    model = get_peft_model(llama_model(tokenizer), lora_config())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    save_once(LoRAAdapter(merged_final=True), model, tokenizer, tmp_path, "final", 1, final=True)
    merged_dir = tmp_path / "final" / "merged"
    reference = copy.deepcopy(model).merge_and_unload()
    reference.save_pretrained(tmp_path / "reference", max_shard_size=64 * 1024)
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reference_index = json.loads((tmp_path / "reference" / "model.safetensors.index.json").read_text())
    assert index == reference_index
    served = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert torch.equal(logits(served, tokenizer), logits(reference, tokenizer))


def test_a_bf16_base_merges_in_fp32_and_is_saved_in_bf16_like_merge_and_unload(tmp_path, tokenizer):
    model = get_peft_model(llama_model(tokenizer).to(torch.bfloat16), lora_config())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    assert any(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_A" in n)  # PEFT's fp32 adapter
    strategy = LoRAAdapter(merged_final=True)
    stored = strategy.plan(model, final=True).stored_bytes
    assert stored > sum(p.numel() * 2 for n, p in model.named_parameters() if "lora" not in n)
    save_once(strategy, model, tokenizer, tmp_path, "final", 1, final=True)
    merged = load_file(tmp_path / "final" / "merged" / "model.safetensors")
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() <= reference.keys() and all(t.dtype == torch.bfloat16 for t in merged.values())
    for name, tensor in merged.items():
        assert torch.equal(tensor, reference[name]), name


def test_lora_on_a_tied_lm_head_merges_into_an_untied_model_that_matches(tmp_path, tokenizer):
    """Tied embeddings with LoRA on lm_head: the trained model reads W at the input and W + BA at the output, which
    only an untied model can hold (PEFT's merge_and_unload cannot)."""
    model = get_peft_model(llama_model(tokenizer, tie=True), lora_config(target_modules=["q_proj", "lm_head"]))
    trainer = make_trainer(model, tokenizer, tmp_path, CheckpointCallback(LoRAAdapter(merged_final=True)))
    trainer.train()
    merged_dir = tmp_path / "final" / "merged"
    assert json.loads((merged_dir / "config.json").read_text())["tie_word_embeddings"] is False
    saved = load_file(merged_dir / "model.safetensors")
    base = model.get_base_model()
    assert saved["model.embed_tokens.weight"].equal(base.model.embed_tokens.weight.detach())
    assert not saved["lm_head.weight"].equal(saved["model.embed_tokens.weight"])
    served = AutoModelForCausalLM.from_pretrained(merged_dir)
    difference = (logits(served, tokenizer) - logits(model, tokenizer)).abs().max().item()
    assert difference <= ATOL, difference
    assert verify_checkpoint(tmp_path / "final") == []
