"""Models whose weights transformers converts at load (fused MoE experts) are saved in the original format."""

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, OlmoeConfig, OlmoeForCausalLM

from conftest import logits
from open_instruct_ckpt import FullModel
from open_instruct_ckpt._write.saver import save_once


def tiny_olmoe(vocab_size):
    torch.manual_seed(0)
    config = OlmoeConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, eos_token_id=2, bos_token_id=1, pad_token_id=3,
    )
    return OlmoeForCausalLM(config)


def test_fused_experts_are_split_back_like_save_pretrained(tmp_path, tokenizer):
    model = tiny_olmoe(len(tokenizer))
    assert any("experts.gate_up_proj" in name for name, _ in model.named_parameters())
    model.save_pretrained(tmp_path / "reference")
    ours = save_once(FullModel(max_shard_size=20_000), model, tokenizer, tmp_path / "ours").path
    reference = load_file(tmp_path / "reference" / "model.safetensors")
    saved = {}
    for shard in ours.glob("model-*.safetensors"):
        saved.update(load_file(shard))
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in reference
    assert set(saved) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(saved[name], tensor), name
    loaded = AutoModelForCausalLM.from_pretrained(ours)
    assert torch.equal(logits(loaded, tokenizer), logits(model, tokenizer))
