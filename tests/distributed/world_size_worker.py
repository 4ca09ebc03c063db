"""Launched under torchrun by test_world_size.py; never collected by pytest.

Builds a Trainer with CheckpointCallback the way `accelerate launch` with an FSDP config does on a machine
without an accelerator (ACCELERATE_USE_FSDP=true, no PartialState set up first): TrainingArguments then sees
world_size=1 on every rank while torch.distributed runs 2. Writes `<out>/rank<R>.json` with what it saw.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from transformers import Trainer, TrainingArguments

from open_instruct_ckpt import CheckpointCallback, FullModel
from open_instruct_ckpt.tiny import TinyTextDataset, llama_model, llama_tokenizer


def main(out: Path) -> None:
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = llama_tokenizer()
    args = TrainingArguments(output_dir=str(out / "ckpt"), max_steps=2, report_to=[], save_only_model=True)
    report = {"world_size": args.world_size, "should_save": args.should_save, "ranks": dist.get_world_size()}
    try:
        Trainer(model=llama_model(tokenizer), args=args, train_dataset=TinyTextDataset(len(tokenizer)),
                processing_class=tokenizer, callbacks=[CheckpointCallback(FullModel())])
        report["error"] = None
    except ValueError as exc:
        report["error"] = str(exc)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
