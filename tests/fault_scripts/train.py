"""A real training run for the preemption tests; works alone or under torchrun (gloo on CPU).

Usage: [torchrun --nproc_per_node 2] train.py OUTPUT_DIR WORKDIR
Touches WORKDIR/started-<rank> when training has begun and WORKDIR/step3-<rank> after step 3 (the
DataLoader workers exist by then), sleeps a little each step, and writes WORKDIR/rank<rank>.json with
the step it stopped at, whether it was preempted, and the state of this rank's child processes (its
DataLoader workers) at the step where training was told to stop.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch.distributed
from accelerate import PartialState
from transformers import Trainer, TrainerCallback, TrainingArguments

from open_instruct_ckpt import CheckpointCallback, FullModel
from open_instruct_ckpt.tiny import TinyTextDataset, llama_model, llama_tokenizer


def children() -> list[dict]:
    """This process's children as {pid, state, usr1_caught}, read from /proc (Linux)."""
    found = []
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except FileNotFoundError:  # already exited and reaped
                found.append({"pid": int(pid), "state": "gone", "usr1_caught": False})
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines())
            caught = int(fields["SigCgt"], 16) >> (signal.SIGUSR1 - 1) & 1
            found.append({"pid": int(pid), "state": fields["State"].split()[0], "usr1_caught": bool(caught)})
    return found


class Pace(TrainerCallback):
    def __init__(self, workdir: Path, rank: int) -> None:
        self.marker = workdir / f"started-{rank}"
        self.step_marker = workdir / f"step3-{rank}"
        self.children_at_stop: list[dict] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.marker.touch()

    def on_step_begin(self, args, state, control, **kwargs):
        time.sleep(0.05)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            self.step_marker.touch()
        if control.should_training_stop and self.children_at_stop is None:
            self.children_at_stop = children()


def main(output_dir: str, workdir: Path) -> None:
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        PartialState(cpu=True, backend="gloo")  # cpu=True: MULTI_CPU, so the Trainer wraps in DDP
    rank = int(os.environ.get("RANK", 0))
    tokenizer = llama_tokenizer()
    args = TrainingArguments(
        output_dir=output_dir, max_steps=100_000, save_strategy="steps", save_steps=100_000,
        per_device_train_batch_size=2, report_to=[], logging_steps=100_000, use_cpu=True,
        disable_tqdm=True, save_only_model=True, dataloader_num_workers=2 if distributed else 0,
        accelerator_config={"use_configured_state": True} if distributed else None,
    )
    callback = CheckpointCallback(FullModel())
    pace = Pace(workdir, rank)
    trainer = Trainer(
        model=llama_model(tokenizer), args=args, processing_class=tokenizer,
        train_dataset=TinyTextDataset(len(tokenizer), rows=100_000), callbacks=[callback, pace],
    )
    trainer.train()
    result = {"step": trainer.state.global_step, "preempted": callback.preempted, "children": pace.children_at_stop,
              "wrapped": type(trainer.model_wrapped).__name__}
    (workdir / f"rank{rank}.json").write_text(json.dumps(result))
    if distributed:
        del trainer
        gc.collect()  # free the DDP reducer, which holds the process group, before destroying it
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
