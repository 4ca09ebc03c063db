"""Launched by tests/distributed under torchrun (2 processes, gloo on CPU); never collected by pytest.

Trains a tiny model with a real Trainer (DeepSpeed ZeRO-2/3, FSDP2, plain DDP; FSDP1 only to be
refused), saves with CheckpointCallback, and writes what the tests check:
  <out>/ckpt/                   the checkpoints (args.output_dir)
  <out>/reference/step_<N>.pt   rank 0: live tensors and logits at each save step
  <out>/reports/rank<R>.json    every rank: sharding, gathers, audit of writes, errors
Non-writer ranks run with RLIMIT_FSIZE=0 and an audit hook on the checkpoint directory.

Exit status: 0 after a clean run; an unexpected error is re-raised (non-zero). With
--expect-error, every rank writes its report, waits for the others, and exits EXPECTED_ERROR
when it failed (UNEXPECTED_SUCCESS when it did not), so the test can read both reports.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import gc
import json
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from spies import allow_file_writes, forbid_file_writes, install_audit, spy_on_gathers
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

import open_instruct_ckpt._engines as _gather
from open_instruct_ckpt import CheckpointCallback, FullModel, LoRAAdapter, ModelAttribute
from open_instruct_ckpt._format.manifest import RUN_RECORD_NAME
from open_instruct_ckpt._write import safetensors as _safetensors
from open_instruct_ckpt._write.layout import pretrained_weights
from open_instruct_ckpt.tiny import TinyTextDataset, llama_model, llama_tokenizer

PROBE_IDS = [[5, 6, 7, 8, 9, 10, 11, 12]]
EXPECTED_ERROR, UNEXPECTED_SUCCESS = 3, 4
DEEPSPEED, FSDP = ("zero2", "zero3"), ("fsdp1", "fsdp2")
EMBEDDINGS = ("embed_tokens.weight", "lm_head.weight")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--strategy", choices=["full", "lora", "attribute"], default="full")
    parser.add_argument("--engine", choices=["zero3", "zero2", "fsdp2", "fsdp1", "ddp"], default="zero3")
    parser.add_argument("--max-shard-size", type=int, default=None)
    parser.add_argument("--tie", action="store_true")
    parser.add_argument("--lora-embeddings", action="store_true", help="LoRAAdapter(save_embedding_layers=True)")
    parser.add_argument("--merged-final", action="store_true", help="LoRAAdapter(merged_final=True)")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--keep-last", type=int, default=None, help="save_total_limit")
    parser.add_argument("--offload", action="store_true", help="FSDP2 CPU offload of parameters")
    parser.add_argument("--forward-before-save", action="store_true", help="an eval-like forward before each save")
    parser.add_argument("--sigusr1-at-step", type=int, default=None, help="rank 1 signals itself during that step")
    parser.add_argument("--gather-16bit", action="store_true", help="stage3_gather_16bit_weights_on_model_save")
    parser.add_argument("--ds-config-from-accelerate", action="store_true",
                        help="DeepSpeed config as `accelerate launch --config_file` passes it, not in TrainingArguments")
    parser.add_argument("--trainer-checkpoints", action="store_true")
    parser.add_argument("--fail-free-space-at-step", type=int, default=None, help="rank 0 sees a full disk")
    parser.add_argument("--fail-shard-write-at-step", type=int, default=None, help="rank 0's disk fills mid-save")
    parser.add_argument("--writers", choices=["main", "all"], default="main", help="FullModel(writers=...)")
    parser.add_argument("--async-save", action="store_true", help="CheckpointCallback(async_save=True)")
    parser.add_argument("--slow-disk", type=float, default=0.0,
                        help="seconds each checkpoint file waits before it is written (training goes on meanwhile)")
    parser.add_argument("--unshared-output-dir", action="store_true",
                        help="output_dir 'ckpt' relative to a directory of each rank's own: storage not shared")
    parser.add_argument("--expect-error", action="store_true")
    return parser.parse_args()


# -- models and configs ---------------------------------------------------------------------------

class PolicyWithValue(nn.Module):
    """A PPO-style composite: a causal LM policy plus a scalar value head."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.hidden_size, 1)

    def forward(self, input_ids, labels=None, **_):
        out = self.policy(input_ids=input_ids, labels=labels, output_hidden_states=True)
        value = self.value_head(out.hidden_states[-1])
        loss = out.loss + 0.1 * value.pow(2).mean() if labels is not None else None
        return {"loss": loss, "logits": out.logits}


def build(strategy: str, tokenizer, tie: bool, lora_embeddings: bool = False, merged_final: bool = False):
    base = llama_model(tokenizer, tie=tie)
    if strategy == "full":
        return base, FullModel
    if strategy == "attribute":
        torch.manual_seed(1)
        return PolicyWithValue(base), lambda **kw: ModelAttribute("policy", **kw)
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(base, config), lambda **kw: LoRAAdapter(save_embedding_layers=lora_embeddings or None,
                                                                  merged_final=merged_final)


def deepspeed_config(engine: str, gather_16bit: bool) -> dict:
    zero: dict = {"stage": 3 if engine == "zero3" else 2}
    if engine == "zero3":
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=gather_16bit)
    return {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "lr": "auto", "weight_decay": "auto"}},
    }


def engine_arguments(opts: argparse.Namespace) -> dict:
    if opts.engine in DEEPSPEED:
        config = deepspeed_config(opts.engine, opts.gather_16bit)
        return {} if opts.ds_config_from_accelerate else {"deepspeed": config}
    if opts.engine in FSDP:
        fsdp_config = {
            "version": int(opts.engine[-1]), "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "cpu_offload": opts.offload,
        }
        if opts.engine == "fsdp1":
            fsdp_config["sync_module_states"] = False  # True looks for an accelerator device when the Trainer is built
        return {"use_cpu": True, "fsdp": True, "fsdp_config": fsdp_config}
    return {"use_cpu": True}


def training_args(opts: argparse.Namespace):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir="ckpt" if opts.unshared_output_dir else str(opts.out / "ckpt"), max_steps=opts.max_steps, save_strategy="steps", save_steps=2,
        save_total_limit=opts.keep_last, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
        logging_steps=100, disable_tqdm=True, save_only_model=not opts.trainer_checkpoints, seed=0, ddp_timeout=120,
        accelerator_config={"use_configured_state": True}, **engine_arguments(opts),
    )


# -- in-run recording -----------------------------------------------------------------------------

def live_state(params: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor] | None:
    """Collective: the full values of `params`, gathered the engines' own way (not the library's); kept if `keep`."""
    partitioned = [p for p in params.values() if hasattr(p, "ds_id")]
    gather = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    state = {}
    with gather, torch.no_grad():
        for name, p in params.items():
            full = p.full_tensor() if isinstance(p, DTensor) else p
            if keep:
                state[name] = full.detach().clone()
    return state if keep else None


def sharded_now(model: nn.Module) -> int:
    """Parameters in their sharded resting form: empty ZeRO-3 partitions, FSDP2 DTensors."""
    return sum(p.numel() == 0 if hasattr(p, "ds_id") else isinstance(p, DTensor) for p in model.parameters())


def _disk_full_on_open(path, planned, metadata=None):
    with open(path, "wb") as handle:
        handle.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def _probe_forward(model: nn.Module) -> torch.Tensor:
    """Collective under ZeRO-3/FSDP2 (every rank runs it): the logits of PROBE_IDS, as an evaluation would."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROBE_IDS))["logits"]
    model.train(was_training)
    return logits


class Recorder(TrainerCallback):
    """Runs before CheckpointCallback: sharding proof, the non-writer guard, faults, the preemption signal."""

    def __init__(self, opts: argparse.Namespace, report: dict) -> None:
        self.opts, self.report = opts, report

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.report["sharded_params"] = sum(_gather.is_sharded(p) for p in model.parameters())
        self.report["params"] = sum(1 for _ in model.parameters())
        self.report["param_devices"] = sorted({str(getattr(p, "_local_tensor", p).device) for p in model.parameters()})
        if not args.should_save and self.opts.writers == "main":
            self.report["rlimit_probe"] = forbid_file_writes(self.opts.out / "reports" / f"probe{dist.get_rank()}")

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.opts.sigusr1_at_step and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1: the writer learns of it through the all-reduce

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step == self.opts.fail_free_space_at_step and args.should_save:
            shutil.disk_usage = lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000)
        if step == self.opts.fail_shard_write_at_step and args.should_save:
            _safetensors.open_stream = _disk_full_on_open
        if control.should_save:  # what the save is handed: every parameter still sharded?
            self.report.setdefault("sharded_at_save", []).append(sharded_now(model))
            self.report.setdefault("save_started", {})[step] = time.time()
            if self.opts.forward_before_save:
                _probe_forward(model)  # FSDP2 leaves the root and the tail unsharded after this


class Reference(TrainerCallback):
    """Runs after CheckpointCallback (a forward leaves ZeRO-3 parameters gathered): the live model's
    tensors and logits at each save, written by rank 0 to `<out>/reference/step_<N>.pt`."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts

    def on_step_end(self, args, state, control, model=None, **kwargs):
        scheduled = state.global_step % args.save_steps == 0 or state.global_step == state.max_steps
        if scheduled or control.should_training_stop:  # the latter: a preemption save
            self._reference(model, state.global_step, args.should_save)

    def _reference(self, model: nn.Module, step: int, is_writer: bool) -> None:
        target = model.policy if self.opts.strategy == "attribute" else model
        wanted = {n: p for n, p in target.named_parameters() if self._saved(n, p)}
        state = live_state(wanted, keep=is_writer)
        logits = _probe_forward(model)  # the policy's logits for "attribute"
        if is_writer:
            (self.opts.out / "reference").mkdir(exist_ok=True)
            torch.save({"state": state, "logits": logits}, self.opts.out / "reference" / f"step_{step}.pt")

    def _saved(self, name: str, param: nn.Parameter) -> bool:
        if self.opts.strategy != "lora":
            return True
        return param.requires_grad or (self.opts.lora_embeddings and name.endswith(EMBEDDINGS))


def capture_warnings(report: dict) -> None:
    import logging

    class Keep(logging.Handler):
        def emit(self, record):
            report.setdefault("warnings", []).append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    for name in ("open_instruct_ckpt", "open_instruct_ckpt.callback"):
        logging.getLogger(name).addHandler(handler)


# -- the run --------------------------------------------------------------------------------------

def slow_down_the_disk(seconds: float) -> None:
    real = _safetensors.open_stream

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    _safetensors.open_stream = slow


def set_up_processes(opts: argparse.Namespace, report: dict) -> int:
    """Audit hook on every rank (the writer's shows the hook sees writes), then the process group."""
    rank = int(os.environ["RANK"])
    if opts.unshared_output_dir:
        storage = opts.out / f"storage{rank}"
        storage.mkdir(parents=True)
        os.chdir(storage)
    (opts.out / "reports").mkdir(parents=True, exist_ok=True)
    install_audit(opts.out / "ckpt", report["audit"] if rank != 0 else report.setdefault("writer_audit", []))
    if opts.engine in DEEPSPEED:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    if opts.engine in DEEPSPEED and opts.ds_config_from_accelerate:  # what `accelerate launch --config_file` sets
        config_file = opts.out / f"ds_config{rank}.json"
        config_file.write_text(json.dumps(deepspeed_config(opts.engine, opts.gather_16bit)))
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(config_file)
    if opts.engine in FSDP:
        os.environ["ACCELERATE_USE_FSDP"] = "true"
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    # Before TrainingArguments, or it computes world size 1 on CPU. Without DeepSpeed or FSDP,
    # cpu=True makes it MULTI_CPU, so the Trainer really wraps the model in DistributedDataParallel.
    # The process group's timeout (TrainingArguments' ddp_timeout comes too late to apply): a hang fails in 2 min.
    state = PartialState(cpu=opts.engine == "ddp", backend="gloo", timeout=datetime.timedelta(seconds=120))
    if opts.engine in FSDP:
        state.distributed_type = DistributedType.MULTI_GPU  # so accelerate takes the FSDP path; the device stays cpu
    return rank


def record_plan(report: dict, strategy, model: nn.Module, max_shard_size) -> None:
    weights = pretrained_weights(strategy.saved_module(model), max_shard_size)
    report["largest_group_bytes"] = max(sum(_gather.stored_nbytes(t) for t in own.values()) for _, own in weights.groups)
    report["model_bytes"] = weights.stored_bytes


def recorded_peaks(opts: argparse.Namespace) -> list[int]:
    """The writer's peak bytes held by each step save, as the run recorded them (none on other ranks)."""
    record = Path("ckpt" if opts.unshared_output_dir else opts.out / "ckpt") / RUN_RECORD_NAME
    if not record.is_file():
        return []
    return [save["peak_held_bytes"] for save in json.loads(record.read_text())["saves"]]


def make_trainer(opts: argparse.Namespace, report: dict, gathered: list, gather_bytes: list):
    from transformers import Trainer

    args, tokenizer = training_args(opts), llama_tokenizer()
    model, strategy_class = build(opts.strategy, tokenizer, opts.tie, opts.lora_embeddings, opts.merged_final)
    strategy = strategy_class(max_shard_size=opts.max_shard_size)
    callback = CheckpointCallback(strategy, trainer_checkpoints=opts.trainer_checkpoints or None,
                                  async_save=opts.async_save, writers=opts.writers)
    spy_on_gathers(model, gathered, gather_bytes, deepspeed=opts.engine in DEEPSPEED)
    report.update(should_save=args.should_save, world_size=args.world_size)
    if args.should_save and opts.strategy != "lora":
        record_plan(report, strategy, model, opts.max_shard_size)
    trainer = Trainer(
        model=model, args=args, train_dataset=TinyTextDataset(len(tokenizer), rows=32), processing_class=tokenizer,
        callbacks=[Recorder(opts, report), callback, Reference(opts)],
    )
    if opts.offload:
        from torch.distributed.fsdp import CPUOffloadPolicy

        # Pinned host memory needs an accelerator; on GPUs cpu_offload=True gives the pinned policy.
        trainer.accelerator.state.fsdp_plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
    report["offload_policy"] = repr(getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None), "cpu_offload", None))
    return trainer


def main() -> None:
    opts = parse()
    report: dict = {"audit": []}
    rank = set_up_processes(opts, report)
    capture_warnings(report)
    if opts.slow_disk:
        slow_down_the_disk(opts.slow_disk)
    gathered, gather_bytes = [], []
    trainer, error = None, None
    try:
        trainer = make_trainer(opts, report, gathered, gather_bytes)
        trainer.train()
    except Exception as exc:  # reported for the tests to compare across ranks
        error = exc
        report.update(error=f"{type(exc).__name__}: {exc}", error_at=time.time(), traceback=traceback.format_exc())
    finally:
        allow_file_writes()
    report.update(rank=rank, gathered=gathered, gather_bytes=gather_bytes, peaks=recorded_peaks(opts))
    if trainer is not None:
        callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, CheckpointCallback))
        report.update(wrapped=type(trainer.model_wrapped).__name__, preempted=callback.preempted,
                      stopped_at=trainer.state.global_step,
                      staging_capacity=callback.saver.staging_capacity if callback.saver is not None else 0)
    del trainer  # the DDP reducer holds the process group: freed before the group is torn down
    end_launch(opts.out / "reports" / f"rank{rank}.json", report, error, opts.expect_error)


def end_launch(report_file: Path, report: dict, error: BaseException | None, expect_error: bool) -> None:
    """Write this rank's report, then end as the test expects: an unexpected error is re-raised (non-zero exit);
    with `expect_error`, every rank's report is written before any exits, then EXPECTED_ERROR (or
    UNEXPECTED_SUCCESS). The caller drops its Trainer first, or the group can be torn down at interpreter exit,
    where gloo once aborted ("terminate called without an active exception")."""
    report_file.write_text(json.dumps(report, indent=1))
    if error is not None and not expect_error:
        raise error
    gc.collect()
    if expect_error:  # torchrun stops the other ranks when one exits non-zero: every report first
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    dist.destroy_process_group()
    if expect_error:
        sys.exit(EXPECTED_ERROR if error is not None else UNEXPECTED_SUCCESS)


if __name__ == "__main__":
    main()
