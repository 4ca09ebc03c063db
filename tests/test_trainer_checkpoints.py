"""The Trainer's own resumable `checkpoint-N` beside ours: kept by default unless `save_only_model`, forced either way
by `trainer_checkpoints`, the choice logged once with its reason; resuming from them still works."""

import logging

from conftest import entries, make_trainer
from open_instruct_ckpt import CheckpointCallback, FullModel, latest_checkpoint
from open_instruct_ckpt.tiny import llama_model


def test_default_keeps_the_trainers_resumable_checkpoints_beside_ours(tmp_path, tokenizer, llama):
    callback = CheckpointCallback(FullModel())
    trainer = make_trainer(llama, tokenizer, tmp_path, callback, max_steps=14, save_steps=0.4, save_only_model=False)
    trainer.train()
    assert entries(tmp_path) == {
        "step_6", "step_12", "step_14", "final", "checkpoint-6", "checkpoint-12", "checkpoint-14"
    }
    resumed = make_trainer(
        llama_model(tokenizer), tokenizer, tmp_path, CheckpointCallback(FullModel()),
        max_steps=16, save_steps=0.4, save_only_model=False,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-12"))
    assert resumed.state.global_step == 16
    assert {"step_14", "step_16"} <= entries(tmp_path)
    assert latest_checkpoint(tmp_path) == tmp_path / "final"


def test_trainer_checkpoints_can_be_forced_either_way(tmp_path, tokenizer):
    make_trainer(llama_model(tokenizer), tokenizer, tmp_path / "on", CheckpointCallback(FullModel(), trainer_checkpoints=True)).train()
    assert entries(tmp_path / "on") == {"step_2", "step_4", "final", "checkpoint-2", "checkpoint-4"}
    off = CheckpointCallback(FullModel(), trainer_checkpoints=False)
    make_trainer(llama_model(tokenizer), tokenizer, tmp_path / "off", off, save_only_model=False).train()
    assert entries(tmp_path / "off") == {"step_2", "step_4", "final"}


def test_init_logs_once_whether_the_trainers_checkpoints_are_kept_and_why(tmp_path, tokenizer, llama, caplog):
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
        make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()))
        make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), save_only_model=False)
    reasons = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Trainer checkpoints")]
    assert reasons == [
        "Trainer checkpoints are skipped: save_only_model=True makes them duplicates of ours",
        "Trainer checkpoints (checkpoint-N, for resume) are kept beside ours: save_only_model=False",
    ]
