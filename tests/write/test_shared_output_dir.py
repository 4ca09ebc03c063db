"""Runs that share an output_dir: a fresh run refuses an earlier run's checkpoints at on_train_begin
(nothing deleted), or supersedes them when asked; a resumed or rolled-back run ranks its own newer."""

import pytest
from transformers import TrainerCallback

from conftest import entries, make_trainer
from open_instruct_ckpt import CheckpointCallback, CheckpointError, FullModel, latest_checkpoint
from open_instruct_ckpt._format.readers import read_manifest
from open_instruct_ckpt.tiny import llama_model


def snapshot(directory):
    return {p.relative_to(directory).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in directory.rglob("*") if p.name != ".open_instruct_ckpt.lock"}


@pytest.fixture
def run_a(tmp_path, tokenizer):
    """Run A reached step 8 with save_total_limit=2: step_6, step_8, final."""
    make_trainer(llama_model(tokenizer), tokenizer, tmp_path, CheckpointCallback(FullModel()), max_steps=8,
                 save_total_limit=2).train()
    assert entries(tmp_path) == {"step_6", "step_8", "final"}
    return tmp_path


def test_fresh_run_is_refused_before_any_step_and_nothing_is_touched(run_a, tokenizer):
    before = snapshot(run_a)
    trainer = make_trainer(llama_model(tokenizer), tokenizer, run_a, CheckpointCallback(FullModel()), max_steps=4,
                           save_total_limit=2)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints of an earlier run \(step_6, step_8, final\) "
                                              r"and this run starts at step 0.*resume_from_checkpoint.*new output_dir"
                                              r".*existing_checkpoints='supersede'"):
        trainer.train()
    assert trainer.state.global_step == 0 and snapshot(run_a) == before


def test_superseding_run_ranks_newer_and_retention_prunes_the_earlier_run_first(run_a, tokenizer):
    callback = CheckpointCallback(FullModel(), existing_checkpoints="supersede")
    seen = []

    class Latest(TrainerCallback):  # runs after ours
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                seen.append(latest_checkpoint(run_a))

    trainer = make_trainer(llama_model(tokenizer), tokenizer, run_a, callback, max_steps=4, save_total_limit=2)
    trainer.add_callback(Latest())
    trainer.train()
    assert seen == [run_a / "step_2"]  # not run A's step_8, though its step is higher
    assert entries(run_a) == {"step_2", "step_4", "final"}  # run A's step_6/step_8 went first
    assert latest_checkpoint(run_a) == run_a / "final" and read_manifest(run_a / "final")["step"] == 4


def test_rolled_back_run_ranks_its_own_checkpoints_newer(tmp_path, tokenizer):
    make_trainer(llama_model(tokenizer), tokenizer, tmp_path, CheckpointCallback(FullModel()), max_steps=8,
                 save_only_model=False).train()
    assert {"step_8", "checkpoint-4"} <= entries(tmp_path)
    rollback = make_trainer(llama_model(tokenizer), tokenizer, tmp_path, CheckpointCallback(FullModel()),
                            max_steps=8, save_steps=2, save_only_model=False)

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                control.should_training_stop = True

    rollback.add_callback(Stop())
    rollback.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert rollback.state.global_step == 6
    assert latest_checkpoint(tmp_path) == tmp_path / "step_6"  # not the abandoned branch's step_8 or final
    assert {"step_8", "final"} <= entries(tmp_path)  # kept: nothing of the earlier run deleted silently
