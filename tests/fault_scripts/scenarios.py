"""Save sequences run by the crash tests: the callback's hooks driven directly, or a real Trainer.

Every run restarts a killed job from scratch in the same output_dir, so it supersedes the earlier run's
checkpoints (existing_checkpoints="supersede")."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

from open_instruct_ckpt import CheckpointCallback, FullModel
from open_instruct_ckpt.tiny import TinyTextDataset, llama_model, llama_tokenizer


def _args(output_dir: Path, max_steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, save_strategy="steps", save_steps=1,
        per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], logging_steps=1000,
        use_cpu=True, disable_tqdm=True, save_only_model=True, seed=0, dataloader_num_workers=0,
    )


def drive_callback(output_dir: Path, model, tokenizer, steps: list[int], max_steps: int, keep_last: int) -> None:
    """One 'run' through the callback's hooks as the Trainer calls them (no Trainer start-up cost)."""
    args, state, control = _args(output_dir, max_steps), TrainerState(), TrainerControl()
    state.max_steps = max_steps
    callback = CheckpointCallback(FullModel(), keep_last=keep_last, existing_checkpoints="supersede")
    hooks = dict(model=model, processing_class=tokenizer)
    callback.on_init_end(args, state, control, **hooks)
    callback.on_train_begin(args, state, control, **hooks)
    for step in steps:
        state.global_step, control.should_save = step, True
        callback.on_step_end(args, state, control, **hooks)
    callback.on_train_end(args, state, control, **hooks)


def callback_runs(output_dir: Path) -> None:
    """Run 1 saves step_1, step_2 (pruning step_1) and links final; run 2 restarts and replaces step_2."""
    tokenizer = llama_tokenizer()
    model = llama_model(tokenizer)
    drive_callback(output_dir, model, tokenizer, [1, 2], max_steps=2, keep_last=1)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    drive_callback(output_dir, model, tokenizer, [2], max_steps=5, keep_last=1)


def callback_restart(output_dir: Path) -> None:
    """A later run in the same output_dir: start-up recovery, then step_3 and final."""
    tokenizer = llama_tokenizer()
    drive_callback(output_dir, llama_model(tokenizer, seed=1), tokenizer, [3], max_steps=3, keep_last=1)


def trainer_run(output_dir: Path, max_steps: int = 2, keep_last: int = 1, extra_callbacks: tuple = ()) -> Trainer:
    tokenizer = llama_tokenizer()
    trainer = Trainer(
        model=llama_model(tokenizer), args=_args(output_dir, max_steps), processing_class=tokenizer,
        train_dataset=TinyTextDataset(len(tokenizer), rows=1024),
        callbacks=[CheckpointCallback(FullModel(), keep_last=keep_last, existing_checkpoints="supersede"), *extra_callbacks],
    )
    trainer.train()
    return trainer


def trainer_runs(output_dir: Path) -> None:
    """Two Trainer runs into one output_dir: the second replaces step_2 and final."""
    trainer_run(output_dir)
    trainer_run(output_dir)


SCENARIOS = {"callback": (callback_runs, callback_restart), "trainer": (trainer_runs, trainer_run)}
