"""Launched by tests/distributed/nodes.py on each of two simulated nodes; never collected by pytest.

Trains the tiny model (ZeRO-3, FSDP2 or DDP) with `output_dir=--disk` (a tmpfs of this node's own, or shared),
optionally `save_on_each_node=True`, async saves, an upload, an `on_published` shell hook, and SIGUSR1 sent to
one process of one node. Writes what the tests check:
  <out>/reference/step_<N>.pt   global rank 0: the live tensors and logits at each save (gathered by every rank)
  <out>/reports/rank<R>.json    every rank: its role, pid, node, verdict, warnings
  <out>/hooks.log               the hook: "<name> <step> <pid of the process that ran it>", one line per run
Ranks that do not save run with RLIMIT_FSIZE=0 from on_train_begin. Exit status as train_worker.py's.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
import traceback
from pathlib import Path

import torch.distributed as dist
import train_worker
from spies import allow_file_writes, forbid_file_writes
from transformers import Trainer, TrainerCallback, TrainingArguments

from open_instruct_ckpt import CheckpointCallback, FullModel, Hook, Stalls, Upload
from open_instruct_ckpt.tiny import TinyTextDataset, llama_tokenizer

SHARD_BYTES = 30000  # the ~96 KB tiny model in 4 files
HOOK = 'test -f "$1/checkpoint.json" && echo "$2 $3 $PPID" >> "$0"'  # reads the uploaded copy, logs who ran it


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--disk", type=Path, required=True, help="output_dir: this node's disk")
    parser.add_argument("--engine", choices=["zero3", "fsdp2", "ddp"], default="zero3")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--keep-last", type=int, default=None)
    parser.add_argument("--save-on-each-node", action="store_true")
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--writers", choices=["main", "all"], default="main")
    parser.add_argument("--upload", default=None, help="Upload(to=...)")
    parser.add_argument("--hook", action="store_true", help="on_published: a shell command writing <out>/hooks.log")
    parser.add_argument("--sigusr1-rank", type=int, default=None)
    parser.add_argument("--sigusr1-at-step", type=int, default=None)
    parser.add_argument("--fill-disk-at-step", type=int, default=None, help="node 1's writer fills its disk")
    parser.add_argument("--expect-error", action="store_true")
    opts = parser.parse_args()
    # what train_worker's helpers read
    opts.strategy, opts.lora_embeddings, opts.tie, opts.offload = "full", False, False, False
    opts.gather_16bit, opts.ds_config_from_accelerate, opts.unshared_output_dir = False, False, False
    return opts


class Signal(TrainerCallback):
    """SIGUSR1 to one process of one node during a step; the non-writers' write ban from on_train_begin."""

    def __init__(self, opts: argparse.Namespace, report: dict) -> None:
        self.opts, self.report = opts, report

    def on_train_begin(self, args, state, control, **kwargs):
        if not args.should_save and self.opts.writers == "main":
            self.report["rlimit_probe"] = forbid_file_writes(self.opts.out / "reports" / f"probe{dist.get_rank()}")

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.opts.fill_disk_at_step and args.should_save and self.report["node"] == 1:
            fill(self.opts.disk / ".filler")

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.opts.sigusr1_at_step and dist.get_rank() == self.opts.sigusr1_rank:
            os.kill(os.getppid(), signal.SIGUSR1)  # this node's torchrun, which the recipe's `trap '' USR1` keeps alive
            os.kill(os.getpid(), signal.SIGUSR1)  # the other ranks learn of it through the all-reduce


def fill(path: Path) -> None:
    """Write until the disk is full (ENOSPC): a real full disk."""
    chunk = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(chunk)
        except OSError:
            pass


class Reference(train_worker.Reference):
    """The live model at each save, gathered by every rank, written by global rank 0 only."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        scheduled = state.global_step % args.save_steps == 0 or state.global_step == state.max_steps
        if scheduled or control.should_training_stop:
            self._reference(model, state.global_step, dist.get_rank() == 0)


def training_args(opts: argparse.Namespace) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(opts.disk), max_steps=opts.max_steps, save_strategy="steps", save_steps=2,
        save_total_limit=opts.keep_last, save_on_each_node=opts.save_on_each_node, per_device_train_batch_size=2,
        learning_rate=1e-2, report_to=[], logging_steps=100, disable_tqdm=True, save_only_model=True, seed=0,
        ddp_timeout=120, accelerator_config={"use_configured_state": True}, **train_worker.engine_arguments(opts),
    )


def callback(opts: argparse.Namespace) -> CheckpointCallback:
    upload = Upload(to=opts.upload, wait_s=60, timeout_s=30) if opts.upload else None
    hook = Hook(["sh", "-c", HOOK, str(opts.out / "hooks.log"), "{url}", "{name}", "{step}"], timeout_s=60) \
        if opts.hook else None
    return CheckpointCallback(FullModel(max_shard_size=SHARD_BYTES), async_save=opts.async_save, writers=opts.writers,
                              upload=upload, on_published=hook, stalls=Stalls(floor_s=60))


def main() -> None:
    opts = parse()
    rank = int(os.environ["RANK"])
    report: dict = {"rank": rank, "node": int(os.environ["GROUP_RANK"]), "pid": os.getpid(), "audit": []}
    train_worker.set_up_processes(opts, report)
    train_worker.capture_warnings(report)
    trainer, error = None, None
    try:
        args, tokenizer = training_args(opts), llama_tokenizer()
        model, _ = train_worker.build("full", tokenizer, tie=False)
        report.update(should_save=args.should_save, world_size=args.world_size)
        trainer = Trainer(model=model, args=args, train_dataset=TinyTextDataset(len(tokenizer), rows=48),
                          processing_class=tokenizer,
                          callbacks=[Signal(opts, report), callback(opts), Reference(opts)])
        trainer.train()
    except Exception as exc:  # reported for the tests to compare across ranks and nodes
        error = exc
        report.update(error=f"{type(exc).__name__}: {exc}", error_at=time.time(), traceback=traceback.format_exc())
    finally:
        allow_file_writes()
    if trainer is not None:
        found = next(c for c in trainer.callback_handler.callbacks if isinstance(c, CheckpointCallback))
        report.update(preempted=found.preempted, stopped_at=trainer.state.global_step)
    del trainer
    train_worker.end_launch(opts.out / "reports" / f"rank{rank}.json", report, error, opts.expect_error)


if __name__ == "__main__":
    main()
