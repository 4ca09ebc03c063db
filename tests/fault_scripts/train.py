"""A real training run for the preemption tests; works alone or under torchrun (gloo on CPU).

Usage: [torchrun --nproc_per_node 2] train.py OUTPUT_DIR WORKDIR
Touches WORKDIR/started-<rank> when training has begun, sleeps a little each step, and writes
WORKDIR/rank<rank>.json with the step it stopped at and whether it was preempted.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from accelerate import PartialState
from transformers import Trainer, TrainerCallback, TrainingArguments

from open_instruct_ckpt import CheckpointCallback, FullModel
from open_instruct_ckpt.tiny import TinyTextDataset, llama_model, llama_tokenizer


class Pace(TrainerCallback):
    def __init__(self, workdir: Path, rank: int) -> None:
        self.marker = workdir / f"started-{rank}"

    def on_train_begin(self, args, state, control, **kwargs):
        self.marker.touch()

    def on_step_begin(self, args, state, control, **kwargs):
        time.sleep(0.05)


def main(output_dir: str, workdir: Path) -> None:
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        PartialState(backend="gloo")
    rank = int(os.environ.get("RANK", 0))
    tokenizer = llama_tokenizer()
    args = TrainingArguments(
        output_dir=output_dir, max_steps=100_000, save_strategy="steps", save_steps=100_000,
        per_device_train_batch_size=2, report_to=[], logging_steps=100_000, use_cpu=True,
        disable_tqdm=True, save_only_model=True, dataloader_num_workers=2 if distributed else 0,
        accelerator_config={"use_configured_state": True} if distributed else None,
    )
    callback = CheckpointCallback(FullModel())
    trainer = Trainer(
        model=llama_model(tokenizer), args=args, processing_class=tokenizer,
        train_dataset=TinyTextDataset(len(tokenizer), rows=100_000), callbacks=[callback, Pace(workdir, rank)],
    )
    trainer.train()
    result = {"step": trainer.state.global_step, "preempted": callback.preempted}
    (workdir / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
