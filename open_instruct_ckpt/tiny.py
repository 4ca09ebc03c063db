"""Tiny models, tokenizers and datasets built locally (no hub): for the demo, tests and benchmarks."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    OlmoConfig,
    OlmoForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

WORDS = "the a model saves checkpoints under zero three with lora adapters and writes tokens to disk".split()
OLMO_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
LLAMA_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def _word_level(special: list[str], unk: str, extra_words: int) -> Tokenizer:
    words = WORDS + [f"w{i}" for i in range(extra_words)]
    vocab = {token: i for i, token in enumerate(special + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(special)
    return tokenizer


def llama_tokenizer(extra_words: int = 32) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=_word_level(LLAMA_SPECIAL, "<unk>", extra_words),
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )


def olmo_tokenizer(extra_words: int = 32) -> PreTrainedTokenizerFast:
    """OLMo-style: `<|endoftext|>` is bos, eos and unk at once; `<|im_end|>` ends chat turns."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_word_level(OLMO_SPECIAL, "<|endoftext|>", extra_words),
        unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


def _sizes(vocab_size: int, hidden: int, layers: int) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )


def llama_model(tokenizer, hidden: int = 32, layers: int = 2, tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        **_sizes(len(tokenizer), hidden, layers), tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def olmo_model(tokenizer, hidden: int = 32, layers: int = 2, seed: int = 0) -> OlmoForCausalLM:
    torch.manual_seed(seed)
    config = OlmoConfig(
        **_sizes(len(tokenizer), hidden, layers),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return OlmoForCausalLM(config)


class PolicyAndValue(torch.nn.Module):
    """A PPO-style composite: a causal-LM `policy` and a scalar `value_head` trained together."""

    def __init__(self, policy: PreTrainedModel) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = torch.nn.Linear(policy.config.hidden_size, 1)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> dict[str, torch.Tensor]:
        out = self.policy(input_ids=input_ids, labels=labels, output_hidden_states=True)
        values = self.value_head(out.hidden_states[-1]).squeeze(-1)
        return {"loss": out.loss + values.pow(2).mean(), "logits": out.logits}


class TinyTextDataset(torch.utils.data.Dataset):
    """Fixed random token sequences for causal-LM training (labels = inputs)."""

    def __init__(self, vocab_size: int, rows: int = 64, length: int = 16, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, vocab_size, (rows, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}
