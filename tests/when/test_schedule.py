"""When the callback saves: exactly when the Trainer's own decision says so, plus final/ at the end."""

import logging

import pytest
from transformers import AutoModelForCausalLM, Trainer

from conftest import entries, make_trainer, training_args
from open_instruct_ckpt import CheckpointCallback, FullModel, latest_checkpoint
from open_instruct_ckpt.tiny import TinyTextDataset, llama_model


def test_ratio_save_steps_with_save_only_model(tmp_path, tokenizer, llama):
    make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), max_steps=14, save_steps=0.4).train()
    assert entries(tmp_path) == {"step_6", "step_12", "step_14", "final"}


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


def test_epoch_strategy_saves_at_each_epoch_end(tmp_path, tokenizer, llama):
    callback = CheckpointCallback(FullModel())
    make_trainer(llama, tokenizer, tmp_path, callback, rows=16, max_steps=-1, num_train_epochs=2, save_strategy="epoch").train()
    assert entries(tmp_path) == {"step_4", "step_8", "final"}


def test_no_save_strategy_writes_only_final(tmp_path, tokenizer, llama):
    make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), save_strategy="no").train()
    assert entries(tmp_path) == {"final"}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "final") is not None


def test_one_log_line_per_save_on_the_writer(tmp_path, tokenizer, llama, caplog):
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
        make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel())).train()
    saved = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Saved checkpoint")]
    assert len(saved) == 2
    assert str(tmp_path / "step_2") in saved[0] and " bytes in " in saved[0]


def test_latest_checkpoint_orders_steps_numerically_and_final_wins_a_tie(tmp_path, tokenizer, llama):
    make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), max_steps=10, save_steps=1, save_strategy="steps").train()
    assert {"step_9", "step_10", "final"} <= entries(tmp_path)
    assert latest_checkpoint(tmp_path) == tmp_path / "final"
    (tmp_path / "final" / "checkpoint.json").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_10"
    assert latest_checkpoint(tmp_path / "missing") is None


def evaluating_trainer(model, tokenizer, output_dir, callback, **overrides):
    dataset = TinyTextDataset(len(tokenizer))
    args = training_args(output_dir, eval_strategy="steps", eval_steps=2, **overrides)
    return Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer,
                   callbacks=[callback])


def test_save_strategy_best_is_rejected_before_training(tmp_path, tokenizer, llama):
    with pytest.raises(ValueError, match=r"save_strategy='best' is decided after evaluation"):
        evaluating_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), save_strategy="best",
                           metric_for_best_model="loss")


def test_load_best_model_at_end_needs_the_trainers_checkpoints(tmp_path, tokenizer, llama):
    with pytest.raises(ValueError, match=r"load_best_model_at_end=True needs the Trainer's own checkpoints"):
        evaluating_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), load_best_model_at_end=True)


def test_missing_tokenizer_names_both_fixes(tmp_path, tokenizer, llama):
    with pytest.raises(ValueError, match=r"pass Trainer\(processing_class=tokenizer\) or CheckpointCallback\(\.\.\., tokenizer=tokenizer\)"):
        Trainer(model=llama, args=training_args(tmp_path), train_dataset=TinyTextDataset(len(tokenizer)),
                callbacks=[CheckpointCallback(FullModel())])


def test_explicit_tokenizer_is_used_without_processing_class(tmp_path, tokenizer, llama):
    trainer = Trainer(model=llama, args=training_args(tmp_path), train_dataset=TinyTextDataset(len(tokenizer)),
                      callbacks=[CheckpointCallback(FullModel(), tokenizer=tokenizer)])
    trainer.train()
    assert "tokenizer.json" in entries(tmp_path / "final")


def test_output_dir_argument_overrides_args_output_dir(tmp_path, tokenizer, llama):
    make_trainer(llama, tokenizer, tmp_path / "trainer", CheckpointCallback(FullModel(), output_dir=tmp_path / "ours")).train()
    assert entries(tmp_path / "ours") == {"step_2", "step_4", "final"}


def test_init_logs_once_whether_the_trainers_checkpoints_are_kept_and_why(tmp_path, tokenizer, llama, caplog):
    with caplog.at_level(logging.INFO, logger="open_instruct_ckpt"):
        make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()))
        make_trainer(llama, tokenizer, tmp_path, CheckpointCallback(FullModel()), save_only_model=False)
    reasons = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Trainer checkpoints")]
    assert reasons == [
        "Trainer checkpoints are skipped: save_only_model=True makes them duplicates of ours",
        "Trainer checkpoints (checkpoint-N, for resume) are kept beside ours: save_only_model=False",
    ]
