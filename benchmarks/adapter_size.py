"""Adapter bytes vs full-model bytes, from stored shapes (no weights allocated: meta device).

    python benchmarks/adapter_size.py            # Llama-2-7B shapes, r=64
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from open_instruct_ckpt import FullModel, LoRAAdapter

LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    with torch.device("meta"):
        base = LlamaForCausalLM(LlamaConfig(**LLAMA_7B)).to(getattr(torch, args.dtype))
        full = FullModel().estimate_bytes(base)
        model = get_peft_model(base, LoraConfig(r=args.rank, target_modules=args.targets.split(",")))
    adapter = LoRAAdapter().estimate_bytes(model)
    print(f"Llama-7B shapes, {args.dtype} base, LoRA r={args.rank} on {args.targets}")
    print(f"full model: {full / 1e9:.2f} GB   adapter: {adapter / 1e6:.1f} MB   ratio full/adapter: {full / adapter:.0f}x")


if __name__ == "__main__":
    main()
