"""CheckpointCallback's argument checks: its own arguments at construction, the Trainer's arguments and
the tokenizer when the Trainer is built; every one before the lock is taken or a handler installed."""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

from transformers import TrainingArguments
from transformers.trainer_utils import SaveStrategy

from .._dist import WRITERS, is_distributed
from .._format.manifest import EXISTING_POLICIES

KEEP_LAST_FROM_ARGS = "save_total_limit"  # keep_last's default: TrainingArguments.save_total_limit

# real output_dir -> (the Trainer's TrainerControl, the CheckpointCallback writing there); weak: a finished
# Trainer's claim lapses with it
_WRITING: dict[str, tuple[weakref.ref, weakref.ref]] = {}


def check_callback_arguments(output_dir: Any, trainer_checkpoints: Any, keep_last: Any, existing: Any,
                             async_save: Any, writers: Any) -> None:
    if not isinstance(async_save, bool):
        raise TypeError(f"async_save={async_save!r} must be True or False")
    if writers not in WRITERS:
        raise ValueError(f"writers={writers!r}: use 'main' (rank 0 writes every file) or 'all' (every rank writes its "
                         "share of the shard files; needs an output_dir shared by all ranks)")
    if output_dir is not None and not isinstance(output_dir, (str, Path)):
        raise TypeError(f"output_dir={output_dir!r} must be a str or pathlib.Path")
    if trainer_checkpoints not in (None, True, False):
        raise TypeError(f"trainer_checkpoints={trainer_checkpoints!r} must be None (automatic), True or False")
    if keep_last != KEEP_LAST_FROM_ARGS:
        check_keep_last(keep_last, "keep_last")
    if existing not in EXISTING_POLICIES:
        raise ValueError(f"existing_checkpoints={existing!r} must be one of {EXISTING_POLICIES}")


def resolve_keep_last(keep_last: Any, args: TrainingArguments) -> int | None:
    """`keep_last`, or the Trainer's `save_total_limit` by default; checked either way."""
    if keep_last == KEEP_LAST_FROM_ARGS:
        return check_keep_last(args.save_total_limit, "TrainingArguments.save_total_limit")
    return check_keep_last(keep_last, "keep_last")


def check_keep_last(keep_last: Any, source: str) -> int | None:
    if keep_last is None:
        return None
    if isinstance(keep_last, bool) or not isinstance(keep_last, int):
        raise TypeError(f"{source}={keep_last!r} must be an int (at least 1), or None to keep every checkpoint")
    if keep_last < 1:
        raise ValueError(f"{source}={keep_last!r}: keep at least 1 checkpoint, or None to keep them all")
    return keep_last


def check_training_arguments(args: TrainingArguments, keeps_trainer: bool, signals: tuple) -> None:
    if args.save_strategy == SaveStrategy.BEST:
        raise ValueError(
            "save_strategy='best' is decided after evaluation, after this callback runs; use "
            "save_strategy='steps' or 'epoch' (the Trainer's load_best_model_at_end still picks the best)"
        )
    if args.load_best_model_at_end and not keeps_trainer:
        raise ValueError(
            "load_best_model_at_end=True needs the Trainer's own checkpoints, which this callback turns off "
            "(save_only_model=True or trainer_checkpoints=False); pass trainer_checkpoints=True"
        )
    if getattr(args, "enable_jit_checkpoint", False) and signals:
        raise ValueError(
            "enable_jit_checkpoint=True installs the Trainer's own SIGTERM handler, which would fight this "
            "callback's preemption handler; set enable_jit_checkpoint=False or pass preemption_signals=()"
        )



def check_writers(writers: str, args: TrainingArguments) -> None:
    """writers="all" shares one checkpoint among all ranks on one filesystem; save_on_each_node=True writes a whole
    copy on each node's own disk. Refused together, whatever the world size, so a script fails on one machine."""
    if writers == "all" and args.save_on_each_node:
        raise ValueError(
            "writers='all' (every rank writes its share of one checkpoint, on storage shared by all ranks) cannot go "
            "with save_on_each_node=True (each node's local rank 0 writes a whole copy on that node's own disk): use "
            "writers='main' with save_on_each_node=True for node-local disks, or save_on_each_node=False with "
            "writers='all' for shared storage"
        )

def resolve_tokenizer(tokenizer: Any, processing_class: Any) -> Any:
    chosen = tokenizer if tokenizer is not None else getattr(processing_class, "tokenizer", processing_class)
    if chosen is None:
        raise ValueError(
            "CheckpointCallback needs a tokenizer to save beside the weights: pass "
            "Trainer(processing_class=tokenizer) or CheckpointCallback(..., tokenizer=tokenizer)"
        )
    if not hasattr(chosen, "save_pretrained"):
        raise TypeError(f"tokenizer {type(chosen).__name__} has no save_pretrained; pass a transformers tokenizer")
    return chosen


def check_one_callback_per_output_dir(output_dir: Path, control: Any, callback: Any) -> None:
    """Two CheckpointCallbacks of one Trainer must not share an output_dir: their step_N and final/ would replace
    each other's and one retention would prune both. Local; the same on every rank."""
    key = os.path.realpath(output_dir)
    held = _WRITING.get(key)
    other = held[1]() if held is not None else None
    if held is not None and other is not None and other is not callback and held[0]() is control:
        raise ValueError(
            f"two CheckpointCallbacks of this Trainer write into output_dir {output_dir} ({other.strategy!r} and "
            f"{callback.strategy!r}); their checkpoints would replace each other's: give each its own directory, "
            "e.g. CheckpointCallback(ModelAttribute('policy'), output_dir='out/policy')"
        )
    _WRITING[key] = (weakref.ref(control), weakref.ref(callback))


def check_world_size(args: TrainingArguments) -> None:
    """TrainingArguments and torch.distributed must agree on the ranks, or every rank believes it is the writer."""
    ranks = _launched_ranks()
    if ranks is None or ranks == args.world_size:
        return
    raise ValueError(
        f"TrainingArguments sees world_size={args.world_size} (should_save={args.should_save} on this rank) but the "
        f"job runs {ranks} ranks (torch.distributed / WORLD_SIZE): accelerate did not set up the distributed state, "
        "which happens on a machine without an accelerator (the FSDP or DeepSpeed path of `accelerate launch` then "
        "falls back to one process per rank). On CPU, create the state first: PartialState(backend='gloo') and "
        "TrainingArguments(..., use_cpu=True, accelerator_config={'use_configured_state': True}) (README: FSDP2, "
        "CPU recipe); on GPUs, check the launcher's num_processes"
    )


def _launched_ranks() -> int | None:
    if is_distributed():
        import torch.distributed as dist

        return dist.get_world_size()
    try:
        ranks = int(os.environ.get("WORLD_SIZE", ""))
    except ValueError:
        return None
    return ranks if ranks > 1 else None


def keeps_trainer_checkpoints(choice: bool | None, args: TrainingArguments) -> bool:
    """`trainer_checkpoints`: forced either way, or (None) kept unless `save_only_model` makes them duplicates."""
    return choice if choice is not None else not args.save_only_model


def trainer_checkpoint_reason(choice: bool | None, args: TrainingArguments) -> str:
    if choice is not None:
        return f"Trainer checkpoints (checkpoint-N, for resume) are {'kept' if choice else 'skipped'}: trainer_checkpoints={choice}"
    if args.save_only_model:
        return "Trainer checkpoints are skipped: save_only_model=True makes them duplicates of ours"
    return "Trainer checkpoints (checkpoint-N, for resume) are kept beside ours: save_only_model=False"
