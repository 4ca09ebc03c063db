"""Shared tiny things, built locally: tokenizers, models, datasets and a Trainer factory."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from open_instruct_ckpt import FullModel
from open_instruct_ckpt._write.roles import SOLO
from open_instruct_ckpt._write.saver import Saver
from open_instruct_ckpt._write.settings import SaveSettings
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


def manifest_bytes(checkpoint: Path) -> int:
    """The bytes of every file a checkpoint's manifest lists."""
    return sum(e["bytes"] for e in json.loads((checkpoint / "checkpoint.json").read_text())["files"].values())


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
    """A real FullModel save that first waits, as a slow gather would (training waits for it, async or not)."""

    delay: float = 1.5

    def plan(self, model, final=False):
        plan = super().plan(model, final)
        transform, slept = plan.weights.transform, []

        def slow(state):
            if not slept:  # the first module's gather, on the writer
                time.sleep(self.delay)
                slept.append(True)
            return transform(state)

        return dataclasses.replace(plan, weights=dataclasses.replace(plan.weights, transform=slow))


def saver_for(tokenizer, output_dir: Path, keep_last=None, async_save=False, **settings) -> Saver:
    """A Saver of one process (it publishes), for several saves of one run outside a Trainer."""
    return Saver(SaveSettings(tokenizer, None, Path(output_dir), keep_last, **settings), SOLO, async_save=async_save)
