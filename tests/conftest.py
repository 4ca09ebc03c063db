"""Shared tiny things, built locally: tokenizers, models, datasets and a Trainer factory."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from open_instruct_ckpt import FullModel
from open_instruct_ckpt.tiny import TinyTextDataset, llama_model, llama_tokenizer, olmo_model, olmo_tokenizer

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parent.parent / ".torch_extensions"))


@pytest.fixture
def tokenizer():
    return llama_tokenizer()


@pytest.fixture
def olmo_tok():
    return olmo_tokenizer()


@pytest.fixture
def llama(tokenizer):
    return llama_model(tokenizer)


@pytest.fixture
def olmo(olmo_tok):
    return olmo_model(olmo_tok)


def training_args(output_dir: Path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir), max_steps=4, save_strategy="steps", save_steps=2,
        per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], logging_steps=100,
        use_cpu=True, disable_tqdm=True, save_only_model=True, seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def make_trainer(model, tokenizer, output_dir: Path, callback, rows: int = 64, **overrides) -> Trainer:
    return Trainer(
        model=model, args=training_args(output_dir, **overrides),
        train_dataset=TinyTextDataset(len(tokenizer), rows=rows), processing_class=tokenizer,
        callbacks=[callback] if callback is not None else [],
    )


def entries(path: Path) -> set[str]:
    """Visible entries of a directory (hidden lock/temporary files excluded)."""
    return {p.name for p in Path(path).iterdir() if not p.name.startswith(".")}


@torch.no_grad()
def logits(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    model.eval()
    return model(input_ids=ids).logits


@dataclass(frozen=True)
class SlowFullModel(FullModel):
    """A real FullModel save that first waits, as a slow gather would."""

    delay: float = 1.5

    def save(self, model, directory, generation_config):
        time.sleep(self.delay)
        return super().save(model, directory, generation_config)
